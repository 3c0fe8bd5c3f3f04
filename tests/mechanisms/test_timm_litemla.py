"""MIT EfficientViT's multi-scale linear attention (timm's `LiteMLA`) against timm's module: float64 outputs
and every gradient (its float32 attention included), BatchNorm statistics, keys both ways, the implicit
map's rows, and a whole EfficientViT after `replace`."""

from __future__ import annotations

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap
from tests.mechanisms.test_timm_vit_variants import _same

import attnzoo
from attnzoo.compat import TimmLiteMLA
from attnzoo.convert import from_timm

timm = pytest.importorskip("timm", reason="timm missing")
from timm.models.efficientvit_mit import LiteMLA  # noqa: E402

D = torch.float64

CASES = [
    ({"in_channels": 16, "out_channels": 16, "dim": 4}, (2, 16, 5, 3)),
    ({"in_channels": 16, "out_channels": 12, "heads": 3, "dim": 2, "use_bias": True, "scales": (3, 5),
      "norm_layer": torch.nn.BatchNorm2d, "act_layer": (torch.nn.ReLU, None)}, (2, 16, 4, 6)),
    ({"in_channels": 8, "out_channels": 8, "dim": 2, "heads_ratio": 0.5, "scales": (), "eps": 1e-3},
     (3, 8, 7, 1)),
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("kwargs", "shape"), CASES)
def test_matches_timm(kwargs, shape, train):
    theirs = randomize(LiteMLA(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmLiteMLA and set(ours.state_dict()) == set(theirs.state_dict())
    _same(theirs, ours, torch.randn(*shape, dtype=D))
    for key, value in theirs.state_dict().items():  # BatchNorm's running statistics moved alike
        torch.testing.assert_close(ours.state_dict()[key], value, atol=1e-12, rtol=1e-12)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    built = TimmLiteMLA(**kwargs).double().train(train)
    built.load_state_dict(theirs.state_dict(), strict=True)
    _same(theirs, built, torch.randn(*shape, dtype=D))


def test_attention_runs_in_float32_as_timm():
    module = randomize(TimmLiteMLA(8, 8, dim=4)).eval()
    x = torch.randn(1, 8, 3, 3, dtype=D)
    q = torch.randn(1, 2, 9, 4, dtype=D).relu()
    k = torch.randn(1, 2, 9, 4, dtype=D).relu()
    v = torch.nn.functional.pad(torch.randn(1, 2, 9, 4, dtype=D), (0, 1), value=1.0)
    exact = q @ (k.transpose(-1, -2) @ v)
    exact = exact[..., :-1] / (exact[..., -1:] + module.eps)
    got = module._attend(q, k, v)
    assert got.dtype == D and 1e-12 < (got - exact).abs().max() < 1e-5  # float32-rounded, as timm's
    assert module(x).dtype == D


def test_capture_records_normalised_kernel_rows():
    module = randomize(TimmLiteMLA(8, 8, dim=4, scales=())).eval()
    with attnzoo.capture_maps(module) as maps:
        module(torch.randn(2, 8, 4, 5, dtype=D))
    (record,) = next(iter(maps.values()))
    assert record.grid == (4, 5) and record.data.shape[:2] == (2, 2) and record.data.shape[-1] == 20
    assert (record.data >= 0).all() and (record.data.sum(-1) <= 1 + 1e-6).all()


def test_errors():
    with pytest.raises(ValueError, match="C=8"):
        TimmLiteMLA(8, 8, dim=4)(torch.randn(1, 6, 3, 3))
    with pytest.raises(ValueError, match="odd"):
        TimmLiteMLA(8, 8, dim=4, scales=(4,))
    with pytest.raises(ValueError, match="heads"):
        TimmLiteMLA(4, 4, dim=8)  # in_channels // dim = 0 heads
    with pytest.raises(TypeError, match="norm_layer must be an nn.Module class"):
        TimmLiteMLA(8, 8, dim=4, norm_layer="bn")


def test_efficientvit_keeps_logits_checkpoint_and_maps():
    model = timm.create_model("efficientvit_b0", pretrained=False, num_classes=3).double()
    check_swap(model, [LiteMLA], torch.randn(2, 3, 64, 64, dtype=D), 4)
    assert not any(isinstance(m, LiteMLA) for m in model.modules())
