"""The library surface without the pipeline: heads by name, the objective and the optimizer from
plain arguments (no config object), as a user would take them into their own training loop."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dmlkit.models.heads import HEADS, ArcFaceHead, ProxyAnchorHead, create_head, head_options
from dmlkit.models.objective import AuxWeights, MarginModel, SEESettings
from dmlkit.models.optim import OptimizerSettings, make_optimizer


class UnitLinear(nn.Linear):
    def forward(self, x):
        return F.normalize(super().forward(x), dim=1)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_each_registered_head_trains_a_step_with_see_from_plain_arguments(name):
    torch.manual_seed(0)
    counts = np.array([5, 1, 3, 2])
    head = create_head(name, 16, counts)
    assert isinstance(head, HEADS[name]) and head.num_classes == 4
    backbone = UnitLinear(10, 16)
    objective = MarginModel(backbone, head, see=SEESettings(weight=0.5, n_expansion=4), sample_rate=1.0)
    optimizer = make_optimizer(OptimizerSettings(lr=1e-2), backbone, list(head.parameters()), torch.device("cpu"))
    x, labels = torch.randn(8, 10), torch.tensor([0, 1, 2, 3, 0, 2, 3, 0])
    before = [p.detach().clone() for p in head.parameters()]
    loss, expanded = objective(x, labels, see_value=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(loss) and expanded == 4  # the top half of 8 rows by cosine to their center
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, head.parameters(), strict=True))
    assert backbone.weight.grad is not None and backbone.weight.grad.abs().sum() > 0


def test_see_off_equals_the_plain_head_loss():
    """Without SEE, the objective is the head's own cross-entropy on the margin logits."""
    torch.manual_seed(0)
    head = create_head("arcface", 8, np.ones(3), scale=20.0, margin=0.2)
    x, labels = F.normalize(torch.randn(6, 8), dim=1), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, expanded = MarginModel(nn.Identity(), head, matmul="fp32")(x, labels, see_value=0.0)
    assert expanded == 0
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(head(x, labels), labels).detach()), abs=1e-6)


def test_aux_weights_mix_the_two_heads_losses():
    torch.manual_seed(0)
    head, aux = create_head("cosface", 8, np.ones(3)), create_head("arcface", 8, np.ones(2))
    x = F.normalize(torch.randn(4, 8), dim=1)
    labels = torch.tensor([[0, 1], [1, 0], [2, 1], [0, -1]])
    model = MarginModel(nn.Identity(), head, aux_head=aux, aux_weights=AuxWeights(identity=0.25, aux=2.0))
    loss, _ = model(x, labels, see_value=0.0)
    own = F.cross_entropy(head(x, labels[:, 0]), labels[:, 0])
    known = labels[:3, 1]
    side = F.cross_entropy(aux(x[:3], known), known)
    assert float(loss.detach()) == pytest.approx(float((0.25 * own + 2.0 * side).detach()), abs=1e-5)


def test_create_head_names_its_options_and_refuses_others():
    assert "proxy_alpha" in head_options("proxy_anchor") and "margin" not in head_options("proxy_anchor")
    assert {"scale", "subcenters", "margin", "dynamic"} <= set(head_options("arcface"))
    head = create_head("arcface", 8, np.array([1, 100]), dynamic="glr3", subcenters=3)
    assert isinstance(head, ArcFaceHead) and head.subcenters == 3
    assert head.margins.tolist() == pytest.approx([0.5, 0.05])
    assert isinstance(create_head("proxy_anchor", 8, np.ones(4), proxy_alpha=16.0), ProxyAnchorHead)
    with pytest.raises(TypeError, match="proxy_alpha"):
        create_head("arcface", 8, np.ones(4), proxy_alpha=16.0)
    with pytest.raises(ValueError, match="unknown head type 'arc'"):
        create_head("arc", 8, np.ones(4))
