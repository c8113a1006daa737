"""One peer recipe, trained the way a user of that library would write it, in the peer environment
(.venv-bench, requirements-bench.txt): never imported by dmlkit, run by `benchmarks/peers.py`.

    .venv-bench/bin/python benchmarks/peer_train.py SPLIT.csv SYSTEM OUT_PREFIX --seed S ...

SPLIT.csv has path,label,role (role train: trains; every row is embedded, in file order). Writes
OUT_PREFIX.npy (L2-normalised embeddings), OUT_PREFIX-flip.npy (each image averaged with its mirror)
and OUT_PREFIX.json (training seconds, steps). Systems:
- oml-triplet: OML's recommended recipe, TripletLossWithMiner(margin 0.1, AllTripletsMiner) with a
  BalanceSampler (classes with one image cannot be sampled in pairs, so they are left out, as OML
  requires);
- oml-arcface: OML's ArcFaceLoss (m 0.5, s 64, its defaults);
- pml-arcface / pml-subcenter: pytorch-metric-learning's ArcFaceLoss / SubCenterArcFaceLoss
  (margin 28.6°, scale 64, 3 sub-centers: their defaults).
All: a timm backbone with its classifier removed (average-pooled features are the embedding),
Resize + RandomHorizontalFlip + ImageNet normalisation, Adam at --lr for the model and the loss's
weights, no schedule: the plain loop of each library's README.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from PIL import Image

SYSTEMS = ("oml-triplet", "oml-arcface", "pml-arcface", "pml-subcenter")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load_images(paths: list[str], size: int) -> torch.Tensor:
    """Every image once, RGB, resized to size × size: uint8 (N, 3, size, size)."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((size, size), Image.BILINEAR)
        out[i] = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)
    return out


def normalise(batch: torch.Tensor) -> torch.Tensor:
    return (batch.float() / 255.0 - MEAN) / STD


def make_loss(system: str, num_classes: int, dim: int) -> torch.nn.Module:
    if system == "oml-triplet":
        from oml.losses.triplet import TripletLossWithMiner
        from oml.miners.inbatch_all_tri import AllTripletsMiner

        return TripletLossWithMiner(margin=0.1, miner=AllTripletsMiner())
    if system == "oml-arcface":
        from oml.losses.arcface import ArcFaceLoss

        return ArcFaceLoss(in_features=dim, num_classes=num_classes)
    from pytorch_metric_learning import losses

    if system == "pml-arcface":
        return losses.ArcFaceLoss(num_classes=num_classes, embedding_size=dim)
    return losses.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=dim)


def batches(system: str, labels: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch's batches of row indices: OML's BalanceSampler for the triplet recipe, shuffled
    batches (a DataLoader with shuffle=True, drop_last) for the classification losses."""
    if system == "oml-triplet":
        from oml.samplers.balance import BalanceSampler

        counts = Counter(labels.tolist())
        keep = np.array([i for i, lab in enumerate(labels) if counts[lab] >= 2])
        sizes = sorted(counts[lab] for lab in set(labels[keep].tolist()))
        n_instances = 4 if sizes[len(sizes) // 4] >= 4 else 2
        n_labels = max(2, min(batch_size // n_instances, len(sizes)))
        sampler = BalanceSampler(labels[keep].tolist(), n_labels=n_labels, n_instances=n_instances)
        return [keep[np.array(b)] for b in sampler]
    order = rng.permutation(len(labels))
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def embed(model: torch.nn.Module, images: torch.Tensor, flip: bool) -> np.ndarray:
    model.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            x = normalise(images[start : start + 256])
            e = F.normalize(model(x), dim=1)
            if flip:
                e = F.normalize(e + F.normalize(model(torch.flip(x, dims=[3])), dim=1), dim=1)
            parts.append(e)
    return torch.cat(parts).numpy().astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("split")
    parser.add_argument("system", choices=SYSTEMS)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)  # BalanceSampler draws from numpy's global generator
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    split = pd.read_csv(args.split, dtype=str, keep_default_na=False)
    images = load_images(split["path"].tolist(), args.image_size)
    train = np.flatnonzero(split["role"].to_numpy() == "train")
    classes = sorted(set(split["label"].iloc[train]))
    labels = np.array([classes.index(lab) for lab in split["label"].iloc[train]])

    model = timm.create_model(args.backbone, pretrained=False, num_classes=0)
    loss = make_loss(args.system, len(classes), model.num_features)
    optimizer = torch.optim.Adam([*model.parameters(), *loss.parameters()], lr=args.lr)
    started, steps = time.time(), 0
    for _ in range(args.epochs):
        model.train()
        for rows in batches(args.system, labels, args.batch_size, rng):
            x = normalise(images[train[rows]])
            flip = torch.rand(len(rows)) < 0.5  # RandomHorizontalFlip
            x[flip] = torch.flip(x[flip], dims=[3])
            value = loss(model(x), torch.from_numpy(labels[rows]))
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            steps += 1
    train_s = time.time() - started
    np.save(f"{args.out}.npy", embed(model, images, flip=False))
    np.save(f"{args.out}-flip.npy", embed(model, images, flip=True))
    with open(f"{args.out}.json", "w") as handle:
        json.dump({"train_s": round(train_s, 1), "steps": steps, "args": vars(args)}, handle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
