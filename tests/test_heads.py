import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import ArcFaceLoss, CosFaceLoss, SubCenterArcFaceLoss

from dmlkit.models.heads import ArcFaceHead, CosFaceHead, adacos_scale, create_head, dynamic_margins, sample_classes


def _data(batch=16, dim=8, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g), torch.randint(0, classes, (batch,), generator=g)


def test_arcface_logits_hand_computed():
    head = ArcFaceHead(2, 2, np.array([0.5, 0.5]), scale=1.0, subcenters=1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    theta = 0.3
    emb = torch.tensor([[math.cos(theta), math.sin(theta)]])
    logits = head(emb, torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(math.cos(theta + 0.5), abs=1e-6)
    assert logits[0, 1].item() == pytest.approx(math.sin(theta), abs=1e-6)  # non-target untouched


def test_arcface_guard_beyond_pi():
    head = ArcFaceHead(2, 2, np.array([0.5, 0.5]), scale=1.0)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    theta = math.pi - 0.2  # θ + m > π
    emb = torch.tensor([[math.cos(theta), math.sin(theta)]])
    assert head(emb, torch.tensor([0]))[0, 0].item() == pytest.approx(math.cos(theta) - 0.5 * math.sin(0.5), abs=1e-6)


@pytest.mark.parametrize("subcenters", [1, 3])
def test_arcface_matches_pytorch_metric_learning(subcenters):
    emb, labels = _data()
    margin = 0.3
    ours = ArcFaceHead(8, 5, np.full(5, margin), scale=20.0, subcenters=subcenters)
    if subcenters == 1:
        ref = ArcFaceLoss(num_classes=5, embedding_size=8, margin=math.degrees(margin), scale=20.0)
    else:
        ref = SubCenterArcFaceLoss(
            num_classes=5, embedding_size=8, margin=math.degrees(margin), scale=20.0, sub_centers=subcenters
        )
    with torch.no_grad():
        ref.W.copy_(ours.weight.t())
    assert F.cross_entropy(ours(emb, labels), labels).item() == pytest.approx(ref(emb, labels).item(), rel=1e-5)


def test_cosface_matches_pytorch_metric_learning():
    emb, labels = _data(seed=1)
    ours = CosFaceHead(8, 5, np.full(5, 0.35), scale=30.0)
    ref = CosFaceLoss(num_classes=5, embedding_size=8, margin=0.35, scale=30.0)
    with torch.no_grad():
        ref.W.copy_(ours.weight.t())
    assert F.cross_entropy(ours(emb, labels), labels).item() == pytest.approx(ref(emb, labels).item(), rel=1e-5)


def test_subcenter_cosine_is_max_over_subcenters():
    head = ArcFaceHead(2, 2, np.zeros(2), scale=1.0, subcenters=2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]]))
    cos = head.cosine(torch.tensor([[0.0, 1.0]]))
    assert cos[0].tolist() == pytest.approx([1.0, 0.8])
    center = head.closest_centers(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
    assert center[0].tolist() == pytest.approx([0.6, 0.8])


def test_dynamic_margins_glr3_and_power():
    counts = np.array([1, 16, 81, 10000])
    m = dynamic_margins(counts, "glr3", a=0.45, b=0.05)
    t = counts**-0.25
    expected = 0.45 * (t - t.min()) / (t.max() - t.min()) + 0.05
    assert m == pytest.approx(expected)
    assert m[0] == pytest.approx(0.5) and m[-1] == pytest.approx(0.05)  # rare classes: the largest margin
    assert dynamic_margins(counts, "power", a=0.27, b=0.05, lam=-0.36) == pytest.approx(0.27 * counts**-0.36 + 0.05)
    assert dynamic_margins(counts, "none", fixed=0.3) == pytest.approx(np.full(4, 0.3))
    assert dynamic_margins(np.array([4, 4]), "glr3") == pytest.approx([0.275, 0.275])
    with pytest.raises(ValueError):
        dynamic_margins(np.array([0, 2]), "glr3")


def test_build_head_uses_per_class_margins_and_adacos():
    head = create_head("arcface", 8, np.array([1, 100]), scale=30.0, dynamic="glr3", dynamic_a=0.45, dynamic_b=0.05)
    assert head.scale == 30.0 and head.margins.tolist() == pytest.approx([0.5, 0.05])
    head = create_head("arcface", 8, np.arange(1, 102), scale="adacos", dynamic="glr3")
    assert head.scale == pytest.approx(6.512694, abs=1e-6)  # √2 · ln(101 − 1) = 1.4142136 · 4.6051702
    assert adacos_scale(2) == pytest.approx(0.980258, abs=1e-6)  # ln(1) = 0 would be no scale: √2 · ln 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_is_fp32_and_finite_under_autocast(dtype):
    emb, labels = _data(batch=64, dim=16, classes=10)
    head = ArcFaceHead(16, 10, np.full(10, 0.5), scale=64.0, subcenters=3)
    emb = emb.requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        logits = head(emb.to(dtype), labels)
        loss = F.cross_entropy(logits, labels)
    assert logits.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


def test_sample_classes_keeps_every_positive_and_draws_the_rest():
    labels = torch.tensor([7, 3, 7, 99, 0])
    classes, columns = sample_classes(labels, 100, 0.1, torch.Generator().manual_seed(0))
    assert len(classes) == 10 and torch.equal(classes, classes.sort().values) and len(set(classes.tolist())) == 10
    assert torch.equal(classes[columns], labels)  # columns are the labels' positions
    # A batch with more classes than the sample keeps them all.
    many = torch.arange(0, 40, 2)
    classes, columns = sample_classes(many, 100, 0.05, torch.Generator().manual_seed(0))
    assert torch.equal(classes, many) and torch.equal(columns, torch.arange(20))
    # Over many draws the negatives are spread evenly over the other classes.
    g = torch.Generator().manual_seed(1)
    hits = torch.zeros(100)
    for _ in range(400):
        hits[sample_classes(torch.tensor([5]), 100, 0.2, g)[0]] += 1
    assert hits[5] == 400
    others = torch.cat([hits[:5], hits[6:]]) / 400
    assert others.mean().item() == pytest.approx(19 / 99, rel=1e-6) and others.min() > 0.1 and others.max() < 0.3


def test_partial_fc_logits_are_the_full_logits_restricted_to_the_sampled_classes():
    emb, labels = _data(batch=12, dim=8, classes=20, seed=4)
    head = ArcFaceHead(8, 20, np.linspace(0.1, 0.5, 20), scale=30.0, subcenters=3)
    classes, columns = sample_classes(labels, 20, 0.5, torch.Generator().manual_seed(2))
    partial = head.margin_logits(
        head.subcenter_cosines(emb, head.center_factors(classes=classes)), columns, head.margins[labels]
    )
    full = head(emb, labels)
    assert torch.allclose(partial, full[:, classes], atol=1e-5)
    F.cross_entropy(partial, columns).backward()
    touched = head.weight.grad.view(20, 3, 8).abs().sum(dim=(1, 2)) > 0
    assert touched.nonzero().flatten().tolist() == classes.tolist()  # only sampled centers get a gradient


def test_partial_fc_gradient_buffer_equals_autograd_over_accumulation_and_steps():
    """The persistent gradient buffer gives the weight the same gradient as autograd's dense gather,
    summed over accumulated micro-batches, and starts clean after the optimizer drops it."""
    emb, labels = _data(batch=24, dim=8, classes=30, seed=5)
    heads = [ArcFaceHead(8, 30, np.full(30, 0.3), scale=20.0, subcenters=2) for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    heads[1].persistent_grad = False
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        for half in (slice(0, 12), slice(12, 24)):  # two micro-batches, one optimizer step
            classes, columns = sample_classes(labels[half], 30, 0.3, generator)
            for head in heads:
                cos = head.subcenter_cosines(emb[half], head.center_factors(classes=classes))
                F.cross_entropy(head.margin_logits(cos, columns, head.margins[labels[half]]), columns).backward()
        assert heads[0].weight.grad.abs().sum() > 0
        assert torch.allclose(heads[0].weight.grad, heads[1].weight.grad, atol=1e-6), f"step {step}"
        for head in heads:  # what the optimizer's zero_grad(set_to_none=True) does
            head.weight.grad = None


def test_partial_fc_adamw_equals_adamw_on_the_sampled_rows_alone():
    """Each sampled row moves as torch's AdamW moves that row alone over the steps it was sampled (its
    own step count); rows never sampled keep weight and state; the rest of the model is plain AdamW;
    a checkpoint of the optimizer resumes to the same result."""
    from dmlkit.models.optim import PartialFCAdamW

    torch.manual_seed(0)
    start = torch.randn(10, 4)
    dense_start = torch.randn(3)
    sampled = [torch.tensor([1, 3, 4]), torch.tensor([3, 7]), torch.tensor([1, 7, 9])]
    grads = [torch.randn(10, 4) for _ in sampled]
    dense_grads = [torch.randn(3) for _ in sampled]

    def run(resume_after: int | None = None):
        weight, dense = torch.nn.Parameter(start.clone()), torch.nn.Parameter(dense_start.clone())
        current = {"rows": None}
        make = lambda: PartialFCAdamW([{"params": [dense], "lr": 1e-3}], weight, 1e-2, 0.05, lambda: current["rows"])  # noqa: E731
        opt = make()
        for i, rows in enumerate(sampled):
            weight.grad = torch.zeros_like(weight)
            weight.grad[rows] = grads[i][rows]
            dense.grad = dense_grads[i].clone()
            current["rows"] = rows
            opt.step()
            if resume_after == i:
                state = opt.state_dict()
                opt = make()
                opt.load_state_dict(state)
        return weight.detach(), dense.detach()

    weight, dense = run()
    for r in range(10):
        steps = [i for i, rows in enumerate(sampled) if r in rows.tolist()]
        row = torch.nn.Parameter(start[r].clone())
        reference = torch.optim.AdamW([row], lr=1e-2, weight_decay=0.05)
        for i in steps:
            row.grad = grads[i][r].clone()
            reference.step()
        assert torch.allclose(weight[r], row.detach(), atol=1e-6), r
    assert torch.equal(weight[[0, 2, 5, 6, 8]], start[[0, 2, 5, 6, 8]])
    plain = torch.nn.Parameter(dense_start.clone())
    reference = torch.optim.AdamW([plain], lr=1e-3, weight_decay=0.05)
    for g in dense_grads:
        plain.grad = g.clone()
        reference.step()
    assert torch.allclose(dense, plain.detach(), atol=1e-6)
    resumed, _ = run(resume_after=0)
    assert torch.allclose(resumed, weight, atol=1e-7)
