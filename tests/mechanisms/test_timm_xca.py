"""timm's cross-covariance attentions as `attnzoo.compat.TimmXCA` (XCiT) and
`TimmCrossCovarianceAttention` (EdgeNeXt): float64 parity with timm (dropout masks and the normalisation's
eps clamp included), the channel rows `capture_maps` records against a plain definition, a whole XCiT and
a whole EdgeNeXt swapped by `attnzoo.replace` with their logits, checkpoints and maps, and errors."""

from __future__ import annotations

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap

import attnzoo
from attnzoo.compat import TimmCrossCovarianceAttention, TimmXCA
from attnzoo.convert import from_timm

xcit = pytest.importorskip("timm.models.xcit", reason="timm missing")
edgenext = pytest.importorskip("timm.models.edgenext", reason="timm missing")
cait = pytest.importorskip("timm.models.cait", reason="timm missing")
D = torch.float64
CLASSES = [("xcit", "XCA", TimmXCA), ("edgenext", "CrossCovarianceAttn", TimmCrossCovarianceAttention)]

CONFIGS = [
    {"dim": 16, "num_heads": 2},
    {"dim": 12, "num_heads": 3, "qkv_bias": True},
    {"dim": 16, "num_heads": 4, "qkv_bias": True, "attn_drop": 0.3, "proj_drop": 0.2},
    {"dim": 6, "num_heads": 6, "attn_drop": 0.5},  # one channel per head: each softmax is over one key
]


def _timm(family: str, name: str, **kwargs: object) -> torch.nn.Module:
    return getattr({"xcit": xcit, "edgenext": edgenext}[family], name)(**kwargs)


def _assert_same(theirs: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor) -> None:
    torch.manual_seed(1)
    want = theirs(x)
    torch.manual_seed(1)  # the same dropout draws: attend's masks are torch's dropout's
    got = ours(x)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(got)
    wanted = torch.autograd.grad(want, [x, *theirs.parameters()], grad)
    for g, w in zip(torch.autograd.grad(got, [x, *ours.parameters()], grad), wanted, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("family", "name", "ours_cls"), CLASSES)
def test_matches_timm_float64(kwargs: dict, train: bool, family: str, name: str, ours_cls: type) -> None:
    theirs = randomize(_timm(family, name, **kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is ours_cls and ours.training == train
    assert list(ours.state_dict()) == list(theirs.state_dict())  # temperature, qkv, proj: timm's order
    x = torch.randn(2, 7, kwargs["dim"], dtype=D, requires_grad=True)
    _assert_same(theirs, ours, x)


@pytest.mark.parametrize(("family", "name", "ours_cls"), CLASSES)
def test_normalisation_clamps_as_timm(family: str, name: str, ours_cls: type) -> None:
    theirs = randomize(_timm(family, name, dim=8, num_heads=2, qkv_bias=True).double()).eval()
    with torch.no_grad():  # query channel 0 is 0, channel 1 has a norm below the eps 1e-12, key 4 is 0
        theirs.qkv.weight[0] = 0.0
        theirs.qkv.weight[1] *= 1e-15
        theirs.qkv.weight[8 + 4] = 0.0
        theirs.qkv.bias[[0, 1, 8 + 4]] = 0.0
    ours = from_timm(theirs)
    x = torch.randn(2, 5, 8, dtype=D, requires_grad=True)
    _assert_same(theirs, ours, x)


def test_timm_fused_path_matches_in_eval_and_drops_no_weights_in_training() -> None:
    theirs = randomize(xcit.XCA(16, 2, attn_drop=0.5).double()).eval()
    ours = from_timm(theirs)
    theirs.fused_attn = True  # timm's experimental SDPA path
    x = torch.randn(2, 7, 16, dtype=D)
    want = theirs(x)
    torch.testing.assert_close(ours(x), want, atol=1e-10, rtol=1e-10)
    theirs.train()  # timm passes no dropout_p to SDPA there: attn_drop is left out (ours applies it)
    torch.testing.assert_close(theirs(x), want, atol=1e-10, rtol=1e-10)
    torch.manual_seed(1)
    assert not torch.allclose(ours.train()(x), want)


def test_capture_records_the_channel_rows() -> None:
    attn = randomize(TimmXCA(12, 2, qkv_bias=True).double()).eval()
    x = torch.randn(2, 5, 12, dtype=D)
    q, k, _ = attn.qkv(x).reshape(2, 5, 3, 2, 6).permute(2, 0, 3, 4, 1)  # (B, h, d, N) each
    q_hat = q / q.norm(dim=-1, keepdim=True)
    k_hat = k / k.norm(dim=-1, keepdim=True)
    weights = (q_hat @ k_hat.transpose(-2, -1) * attn.temperature).softmax(-1)  # (B, h, d, d)
    with attnzoo.capture_maps(attn, queries=[0, 4]) as maps:
        attn(x)
    (record,) = maps[next(iter(maps))]
    assert record.kind == "rows" and record.grid == (6,) and record.query_grid == (6,)
    assert record.queries.tolist() == [0, 4] and record.meta["unit"] == "channel"
    torch.testing.assert_close(record.data, weights[:, :, [0, 4]], atol=1e-12, rtol=1e-12)


def test_replace_in_a_timm_xcit_keeps_logits_checkpoint_and_maps() -> None:
    model = xcit.Xcit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                      cls_attn_layers=1, attn_drop_rate=0.2).double()
    # XCiT's class attention is CaiT's, which converts too
    swapped = check_swap(model, [xcit.XCA, cait.ClassAttn], torch.randn(2, 3, 32, 32, dtype=D),
                         ["blocks.0.attn", "blocks.1.attn", "cls_attn_blocks.0.attn"], seed=5)
    assert {type(m) for m in swapped.modules()} >= {TimmXCA, attnzoo.compat.TimmCaitClassAttention}


def test_replace_in_a_timm_edgenext_keeps_logits_checkpoint_and_maps() -> None:
    model = edgenext.EdgeNeXt(num_classes=3, dims=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                              heads=(2, 2, 2, 4)).double()
    # random layer scales too: timm's 1e-6 would hide the attention
    swapped = check_swap(model, [edgenext.CrossCovarianceAttn], torch.randn(2, 3, 64, 64, dtype=D),
                         ["stages.1.blocks.0.xca", "stages.2.blocks.0.xca", "stages.3.blocks.0.xca"], seed=6)
    with torch.no_grad(), attnzoo.capture_maps(swapped.eval()) as maps:
        swapped(torch.randn(1, 3, 64, 64, dtype=D))
    assert [r.grid for rs in maps.values() for r in rs] == [(8,), (12,), (8,)]  # the head widths


@pytest.mark.parametrize(("family", "name", "ours_cls"), CLASSES)
def test_errors_name_what_was_expected(family: str, name: str, ours_cls: type) -> None:
    with pytest.raises(ValueError, match=r"\(B, N, 8\)"):
        ours_cls(8, 2)(torch.randn(1, 4, 6))
    with pytest.raises(ValueError, match=r"\(B, N, 8\)"):
        ours_cls(8, 2)(torch.randn(4, 8))
    with pytest.raises(ValueError, match="divisible"):
        ours_cls(10, 3)
    with pytest.raises(ValueError, match="attn_drop"):
        ours_cls(8, 2, attn_drop=1.5)
    theirs = _timm(family, name, dim=10, num_heads=3)
    with pytest.raises(RuntimeError):  # timm builds it, and its forward fails
        theirs(torch.randn(1, 4, 10))
    with pytest.raises(TypeError, match=f"cannot convert {name}: its 3 heads do not divide dim 10"):
        from_timm(theirs)
