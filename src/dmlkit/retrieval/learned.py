"""Learned local features and matching through kornia, tensors in, arrays out: DISK (Tyszkiewicz
et al. 2020), ALIKED (Zhao et al. 2023) and the LightGlue matcher (Lindenberger et al. 2023).

kornia and its weights are needed only when `retrieve.verify.extractor` is disk or aliked, or
`retrieve.verify.matcher: lightglue`. The weights are kornia's published checkpoints (DISK 'depth':
`{"extractor": state_dict}`, ALIKED 'aliked-n16', LightGlue's for the extractor), fetched into the
torch hub cache, or a local file of a bare state dict (or DISK's form). DISK is a U-Net: on a CPU
core it takes seconds per 512-px image, so it is a GPU extractor (docs/second-stage.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ExtractorWeightsError
from .local import LocalFeatures

ALIKED_MODEL = "aliked-n16"  # kornia's default ALIKED: 128-d descriptors, LightGlue weights published


def _local_state(weights_file: str, what: str, where: str, key: str = "weights_file") -> dict:
    """A state dict from a local file (DISK's `{"extractor": ...}` form unwrapped), or a clear error."""
    path = Path(weights_file)
    if not path.is_file():
        raise ExtractorWeightsError(f"{where}: retrieve.verify.{key} '{weights_file}' is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch each raise their own kind for a bad file
        raise ExtractorWeightsError(f"{where}: '{weights_file}' holds no {what} weights: {exc}") from None
    state = state.get("extractor", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ExtractorWeightsError(f"{where}: '{weights_file}' holds no {what} weights (no state dict)")
    return state


def _load_into(model: torch.nn.Module, state: dict, what: str, weights_file: str, where: str) -> None:
    """Every parameter of `model` from `state` (buffers may be absent: kornia derives some)."""
    try:
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError) as exc:
        raise ExtractorWeightsError(f"{where}: '{weights_file}' holds no {what} weights: {exc}") from None
    parameters = {name for name, _ in model.named_parameters()}
    missing = [name for name in result.missing_keys if name in parameters]
    if missing:
        raise ExtractorWeightsError(
            f"{where}: '{weights_file}' holds no {what} weights: {len(missing)} parameters missing, e.g. {missing[:3]}"
        )


def _fetch_error(what: str, exc: Exception, where: str, key: str = "weights_file") -> ExtractorWeightsError:
    return ExtractorWeightsError(
        f"{where}: cannot get kornia's {what} weights ({type(exc).__name__}: {exc}). Offline? Run once online (they "
        f"stay in the torch hub cache), or set retrieve.verify.{key} to a local file"
    )


def load_disk(weights_file: str | None, device: torch.device, where: str) -> torch.nn.Module:
    """DISK in eval mode on `device`, from a local file or kornia's 'depth' checkpoint."""
    from kornia.feature import DISK  # kornia loads only for a learned extractor

    if weights_file is None:
        try:
            return DISK.from_pretrained("depth", device=device).eval()
        except Exception as exc:  # offline, moved URL: all end the same way
            raise _fetch_error("DISK", exc, where) from None
    model = DISK()
    _load_into(model, _local_state(weights_file, "DISK", where), "DISK", weights_file, where)
    return model.to(device).eval()


def load_aliked(weights_file: str | None, device: torch.device, where: str, max_keypoints: int) -> torch.nn.Module:
    """ALIKED (`ALIKED_MODEL`) keeping the `max_keypoints` best keypoints, in eval mode on `device`."""
    from kornia.feature import ALIKED  # kornia loads only for a learned extractor

    if weights_file is None:
        try:
            return ALIKED.from_pretrained(ALIKED_MODEL, max_num_keypoints=max_keypoints, device=device).eval()
        except Exception as exc:  # offline, moved URL: all end the same way
            raise _fetch_error("ALIKED", exc, where) from None
    model = ALIKED(model_name=ALIKED_MODEL, max_num_keypoints=max_keypoints)
    _load_into(model, _local_state(weights_file, "ALIKED", where), "ALIKED", weights_file, where)
    return model.to(device).eval()


def load_lightglue(features: str, weights_file: str | None, device: torch.device, where: str) -> torch.nn.Module:
    """LightGlue for `features` (disk | aliked) in eval mode on `device`, from kornia's hub weights or
    a local file (the cvg release's layer names are renamed as kornia does)."""
    from kornia.feature import LightGlue  # kornia loads only for retrieve.verify.matcher: lightglue

    if weights_file is None:
        try:
            return LightGlue(features).to(device).eval()
        except Exception as exc:  # offline, moved URL: all end the same way
            raise _fetch_error(f"LightGlue ({features})", exc, where, "matcher_weights_file") from None
    conf = {k: v for k, v in LightGlue.features[features].items() if k != "weights"}
    model = LightGlue(None, **conf)
    state = _local_state(weights_file, "LightGlue", where, "matcher_weights_file")
    for i in range(model.conf.n_layers):  # the reference implementation's names, as kornia renames them
        for attention in ("self_attn", "cross_attn"):
            state = {k.replace(f"{attention}.{i}", f"transformers.{i}.{attention}"): v for k, v in state.items()}
    _load_into(model, state, "LightGlue", weights_file, where)
    return model.to(device).eval()


@torch.inference_mode()
def disk_features(model: torch.nn.Module, rgb: np.ndarray, max_keypoints: int) -> LocalFeatures:
    """The `max_keypoints` best DISK keypoints (x, y in pixels) of a uint8 RGB image, with their
    unit-norm 128-d descriptors stored as float16; none for an image under 16 px."""
    if rgb.size == 0 or min(rgb.shape[:2]) < 16:
        return LocalFeatures.empty()
    device = next(model.parameters()).device
    image = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1)[None].float() / 255.0
    found = model(image, n=max_keypoints, pad_if_not_divisible=True)[0]
    keypoints = found.keypoints.float().cpu().numpy().reshape(-1, 2)
    descriptors = found.descriptors.float().cpu().numpy().reshape(-1, model.desc_dim)
    return LocalFeatures(keypoints.astype(np.float32), descriptors.astype(np.float16))


@torch.inference_mode()
def aliked_features(model: torch.nn.Module, rgb: np.ndarray, max_keypoints: int) -> LocalFeatures:
    """ALIKED's best keypoints (x, y in pixels, at most `max_keypoints`) of a uint8 RGB image, with
    their unit-norm 128-d descriptors stored as float16; none for an image under 16 px."""
    if rgb.size == 0 or min(rgb.shape[:2]) < 16:
        return LocalFeatures.empty()
    device = next(model.parameters()).device
    image = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1)[None].float() / 255.0
    found = model(image)[0]
    order = torch.argsort(found.keypoint_scores.reshape(-1), descending=True)[:max_keypoints]
    keypoints = found.keypoints.reshape(-1, 2)[order].float().cpu().numpy()
    descriptors = found.descriptors.reshape(len(found.keypoints), -1)[order].float()
    descriptors = torch.nn.functional.normalize(descriptors, dim=1).cpu().numpy()
    return LocalFeatures(keypoints.astype(np.float32), descriptors.astype(np.float16))


@torch.inference_mode()
def lightglue_pairs(model: torch.nn.Module, query: LocalFeatures, candidate: LocalFeatures, size: int) -> np.ndarray:
    """(m, 2) index pairs (query keypoint, candidate keypoint) LightGlue matches. LightGlue normalises
    keypoints by the image's longer side; the cache keeps no image size, so each image's square frame
    is its keypoints' extent (detectors spread over the image: within a few pixels of its longer side),
    at most `size`, the side images were fitted into — a 96-px photo under `image_size: 512` keeps its
    own scale instead of a fifth of it."""
    if len(query) == 0 or len(candidate) == 0:
        return np.zeros((0, 2), np.int64)
    device = next(model.parameters()).device

    def image(features: LocalFeatures) -> dict:
        points = np.clip(features.keypoints, 0, size)
        side = float(min(size, max(16.0, np.ceil(points.max()) + 1)))
        frame = torch.tensor([[side, side]], dtype=torch.float32, device=device)
        descriptors = torch.from_numpy(features.descriptors.astype(np.float32)).to(device)[None]
        return {"keypoints": torch.from_numpy(points).to(device)[None], "descriptors": descriptors, "image_size": frame}

    matches = model({"image0": image(query), "image1": image(candidate)})["matches"][0]
    return matches.cpu().numpy().astype(np.int64).reshape(-1, 2)
