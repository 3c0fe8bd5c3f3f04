"""timm's attentions with LeViT's learned offset bias as `attnzoo.compat.TimmLevitAttention`,
`TimmLevitAttentionDownsample`, `TimmTinyVitAttention` and `TimmEfficientFormerAttention`: float64
parity with timm in eval and training (outputs, gradients of the input and every parameter, BatchNorm
statistics), the classes built directly against timm's state, timm's eval-mode bias cache (its
numbers, and where it goes stale), whole LeViTs (linear and conv), a TinyViT and an EfficientFormer
swapped by `attnzoo.replace` with their logits, checkpoints and maps, the recorded rows against a
plain definition, refusals and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap
from torch import nn

import attnzoo
from attnzoo.compat import (
    TimmEfficientFormerAttention,
    TimmLevitAttention,
    TimmLevitAttentionDownsample,
    TimmTinyVitAttention,
)
from attnzoo.convert import from_timm

levit = pytest.importorskip("timm.models.levit", reason="timm missing")
tiny_vit = pytest.importorskip("timm.models.tiny_vit", reason="timm missing")
efficientformer = pytest.importorskip("timm.models.efficientformer", reason="timm missing")
D = torch.float64
BN = nn.modules.batchnorm._BatchNorm

CASES = [  # (kind, constructor arguments, input shape)
    ("attn", {"dim": 16, "key_dim": 4, "num_heads": 2, "attn_ratio": 2, "resolution": (3, 5)}, (2, 15, 16)),
    ("attn", {"dim": 12, "key_dim": 6, "num_heads": 3, "attn_ratio": 1.5, "resolution": 4,
              "act_layer": nn.Hardswish}, (2, 16, 12)),
    ("attn", {"dim": 16, "key_dim": 4, "num_heads": 2, "attn_ratio": 4, "resolution": (3, 5),
              "use_conv": True}, (2, 16, 3, 5)),
    ("down", {"in_dim": 16, "out_dim": 24, "key_dim": 4, "num_heads": 2, "attn_ratio": 4,
              "resolution": (5, 7)}, (2, 35, 16)),
    ("down", {"in_dim": 16, "out_dim": 8, "key_dim": 4, "num_heads": 4, "stride": 3, "resolution": (5, 7),
              "use_pool": True, "act_layer": nn.Hardswish}, (2, 35, 16)),
    ("down", {"in_dim": 16, "out_dim": 24, "key_dim": 4, "num_heads": 2, "resolution": (5, 7),
              "use_conv": True}, (2, 16, 5, 7)),
    ("down", {"in_dim": 16, "out_dim": 24, "key_dim": 4, "num_heads": 2, "resolution": (4, 5),
              "use_conv": True, "use_pool": True}, (2, 16, 4, 5)),
    ("tiny", {"dim": 16, "key_dim": 8, "num_heads": 2, "attn_ratio": 1, "resolution": (3, 4)}, (4, 12, 16)),
    ("tiny", {"dim": 12, "key_dim": 4, "num_heads": 3, "attn_ratio": 2, "resolution": (3, 3)}, (2, 9, 12)),
    ("eff", {"dim": 16, "key_dim": 4, "num_heads": 2, "attn_ratio": 2, "resolution": (3, 4)}, (2, 12, 16)),
    ("eff", {"dim": 8, "key_dim": 4, "num_heads": 3, "attn_ratio": 4, "resolution": 3}, (2, 9, 8)),
]
TIMM = {"attn": lambda: levit.Attention, "down": lambda: levit.AttentionDownsample,
        "tiny": lambda: tiny_vit.Attention, "eff": lambda: efficientformer.Attention}
OURS = {"attn": TimmLevitAttention, "down": TimmLevitAttentionDownsample, "tiny": TimmTinyVitAttention,
        "eff": TimmEfficientFormerAttention}


def _timm(kind: str, kwargs: dict, train: bool) -> nn.Module:
    theirs = randomize(TIMM[kind]()(**kwargs).double())
    theirs.train(train)  # timm's LeViT-style train() returns None, so no chaining
    return theirs


def _same(theirs: nn.Module, ours: nn.Module, shape: tuple[int, ...]) -> None:
    """Outputs, gradients of the input and of every parameter (by name), BatchNorm statistics."""
    x = torch.randn(*shape, dtype=D, requires_grad=True)
    want, got = theirs(x), ours(x)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(got)
    names = [n for n, _ in theirs.named_parameters()]
    assert names == [n for n, _ in ours.named_parameters()]
    wanted = torch.autograd.grad(want, [x, *theirs.parameters()], grad)
    for g, w in zip(torch.autograd.grad(got, [x, *ours.parameters()], grad), wanted, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)
    norms = [(a, b) for a, b in zip(theirs.modules(), ours.modules(), strict=False) if isinstance(a, BN)]
    assert len(norms) == sum(isinstance(m, BN) for m in ours.modules())
    for a, b in norms:
        assert isinstance(b, BN) and int(a.num_batches_tracked) == int(b.num_batches_tracked)
        torch.testing.assert_close(b.running_mean, a.running_mean, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(b.running_var, a.running_var, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(("kind", "kwargs", "shape"), CASES)
@pytest.mark.parametrize("train", [False, True])
def test_converted_matches_timm_float64(kind: str, kwargs: dict, shape: tuple[int, ...], train: bool) -> None:
    theirs = _timm(kind, kwargs, train)
    ours = from_timm(theirs)
    assert type(ours) is OURS[kind] and ours.training == train
    _same(theirs, ours, shape)


@pytest.mark.parametrize(("kind", "kwargs", "shape"), CASES)
@pytest.mark.parametrize("train", [False, True])
def test_built_directly_matches_timm_with_its_state(kind: str, kwargs: dict, shape: tuple[int, ...],
                                                    train: bool) -> None:
    """attnzoo's own LinearNorm, ConvNorm, subsampling and index, loaded with timm's state_dict."""
    theirs = _timm(kind, kwargs, train)
    ours = OURS[kind](**kwargs, dtype=D)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert torch.equal(ours.attention_bias_idxs, theirs.attention_bias_idxs)
    _same(theirs, ours.train(train), shape)


def test_eval_bias_cache_numbers_and_timm_staleness() -> None:
    """timm caches the gathered bias in eval mode; attnzoo's numbers are the cached ones, and stay
    right where timm's cache goes stale, lacks a graph (filled under no_grad) or keeps a spent one."""
    kwargs = CASES[0][1]
    theirs = _timm("attn", kwargs, False)
    ours = from_timm(theirs)
    x = torch.randn(2, 15, 16, dtype=D)
    with torch.no_grad():
        first = theirs(x)
        assert theirs.attention_bias_cache  # the cache is filled
        torch.testing.assert_close(theirs(x), first, atol=0, rtol=0)
        torch.testing.assert_close(ours(x), first, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(ours(x), first, atol=1e-10, rtol=1e-10)
    changed = copy.deepcopy(theirs.state_dict())
    changed["attention_biases"] += 1.0
    theirs.load_state_dict(changed)
    ours.load_state_dict(changed)
    fresh = _timm("attn", kwargs, False)
    fresh.load_state_dict(changed)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), first, atol=0, rtol=0)  # timm: stale until train()/to()
        torch.testing.assert_close(ours(x), fresh(x), atol=1e-10, rtol=1e-10)
    theirs(x).sum().backward()  # timm: the bias cached under no_grad has no graph
    assert theirs.attention_biases.grad is None
    ours(x).sum().backward()
    assert ours.attention_biases.grad is not None and ours.attention_biases.grad.abs().sum() > 0
    theirs.train()
    assert theirs.eval() is None  # timm's train() returns nothing; it empties the cache
    theirs(x).sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        theirs(x).sum().backward()  # timm: the cached bias's graph was freed by the first backward
    for _ in range(2):
        ours(x).sum().backward()
    assert ours.eval() is ours


@pytest.mark.parametrize("fused", [False, True])
def test_tiny_vit_scale_follows_timm_path(fused: bool) -> None:
    """timm's fused path ignores `scale` (SDPA's default), its other path uses it."""
    theirs = _timm("tiny", CASES[7][1], False)
    theirs.fused_attn, theirs.scale = fused, 0.3
    x = torch.randn(2, 12, 16, dtype=D)
    torch.testing.assert_close(from_timm(theirs)(x), theirs(x), atol=1e-10, rtol=1e-10)


def _check_model(model: nn.Module, x: torch.Tensor, classes: list[type], swapped: int) -> None:
    """`check_swap` (the BatchNorm statistics move alike in training; TinyViT's drop path draws alike),
    and every swapped module's offset bias gets a gradient."""
    swapped_model = check_swap(model, classes, x, swapped)
    names = [n for n, m in swapped_model.named_modules() if type(m) in OURS.values()]
    assert len(names) == swapped
    assert all(swapped_model.get_submodule(n).attention_biases.grad is not None for n in names)


@pytest.mark.parametrize("use_conv", [False, True])
def test_replace_in_a_timm_levit_keeps_logits_checkpoint_and_maps(use_conv: bool) -> None:
    model = levit.Levit(img_size=(80, 48), embed_dim=(16, 24, 32), key_dim=8, depth=(1, 1, 1),
                        num_heads=(2, 2, 2), num_classes=3, use_conv=use_conv).double()
    x = torch.randn(2, 3, 80, 48, dtype=D)  # maps 5 x 3, 3 x 2, 2 x 1
    _check_model(model, x, [levit.Attention, levit.AttentionDownsample], 5)


def test_replace_in_a_timm_tiny_vit_keeps_logits_checkpoint_and_maps() -> None:
    model = tiny_vit.TinyVit(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                             window_sizes=(3, 3, 3, 3), num_classes=3).double()
    x = torch.randn(2, 3, 80, 80, dtype=D)  # maps 10 x 10 and 5 x 5 (padded windows of 3), then 3 x 3
    _check_model(model, x, [tiny_vit.Attention], 3)


def test_replace_in_a_timm_efficientformer_keeps_logits_checkpoint_and_maps() -> None:
    model = efficientformer.EfficientFormer(depths=(1, 1), embed_dims=(8, 16), num_vit=1,
                                            num_classes=3).double()
    x = torch.randn(2, 3, 56, 56, dtype=D)  # the attention's 7 x 7 map
    _check_model(model, x, [efficientformer.Attention], 1)


def test_downsample_rows_follow_the_definition() -> None:
    attn = randomize(TimmLevitAttentionDownsample(8, 12, 4, 2, attn_ratio=2, resolution=(5, 3))).eval()
    x = torch.randn(1, 15, 8, dtype=D)
    with attnzoo.capture_maps(attn, queries=[(2, 1)]) as maps:
        attn(x)
    (rec,) = maps[next(iter(maps))]
    assert rec.grid == (5, 3) and rec.query_grid == (3, 2) and rec.data.shape == (1, 2, 1, 15)
    k = attn.kv(x).reshape(1, 15, 2, 12)[..., :4].transpose(1, 2)  # (1, h, N, kd)
    q = attn.q(x).reshape(1, 6, 2, 4).transpose(1, 2)[:, :, 5:6]  # query (2, 1) is the 6th
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(3), indexing="ij")
    offsets = (rows.flatten() - 4).abs() * 3 + (cols.flatten() - 2).abs()  # from the map's (4, 2)
    logits = q @ k.transpose(-2, -1) / 2.0 + attn.attention_biases[:, offsets][None, :, None]
    torch.testing.assert_close(rec.data, logits.softmax(-1), atol=1e-12, rtol=1e-12)


def test_buffers_rebuild_after_meta_and_reset() -> None:
    pairs = ((TimmLevitAttentionDownsample(8, 12, 4, 2, stride=3, resolution=(5, 4), device="meta"),
              levit.AttentionDownsample(8, 12, 4, 2, stride=3, resolution=(5, 4))),
             (TimmTinyVitAttention(8, 4, 2, resolution=(3, 5), device="meta"),
              tiny_vit.Attention(8, 4, 2, resolution=(3, 5))))
    for ours, theirs in pairs:
        ours.to_empty(device="cpu")
        ours.init_non_persistent_buffers()
        assert torch.equal(ours.attention_bias_idxs, theirs.attention_bias_idxs)
        with torch.no_grad():
            ours.attention_biases.fill_(1.0)
        ours.reset_parameters()
        assert not ours.attention_biases.any()
    assert "attention_bias_idxs" in TimmEfficientFormerAttention(8, 4, 2).state_dict()  # persistent (timm's)


def test_refusals_name_the_reason() -> None:
    theirs = levit.Attention(8, 4, 2, attn_ratio=2, resolution=3)
    theirs.attention_bias_idxs[0, 0] = 1
    with pytest.raises(TypeError, match="cannot convert Attention: its attention_biases .* offset bias"):
        from_timm(theirs)
    other = efficientformer.Attention(8, 4, 2, resolution=3)
    other.attention_bias_idxs.copy_(torch.randint(0, 9, (9, 9)))
    with pytest.raises(TypeError, match="no \\(H, W\\) map's offset index"):
        from_timm(other)
    down = levit.AttentionDownsample(8, 12, 4, 2, resolution=4)
    down.num_heads = 4
    with pytest.raises(TypeError, match="its kv gives 24 channels, not num_heads"):
        from_timm(down)


def test_errors_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"\(B, 16, 8\)"):
        TimmLevitAttention(8, 4, 2, resolution=4)(torch.randn(1, 15, 8))
    with pytest.raises(ValueError, match=r"\(B, 8, 4, 4\)"):
        TimmLevitAttention(8, 4, 2, resolution=4, use_conv=True)(torch.randn(1, 8, 4, 5))
    theirs = levit.Attention(8, 4, 2, resolution=(3, 5), use_conv=True).eval()
    assert theirs is None  # timm's train() returns None
    transposed = levit.Attention(8, 4, 2, resolution=(3, 5), use_conv=True)
    assert transposed(torch.randn(1, 8, 5, 3)).shape == (1, 8, 5, 3)  # timm runs it, with (3, 5)'s offsets
    with pytest.raises(ValueError, match=r"\(B, 8, 3, 5\)"):
        from_timm(transposed)(torch.randn(1, 8, 5, 3))
    with pytest.raises(ValueError, match=r"\(B, 20, 8\)"):
        TimmLevitAttentionDownsample(8, 8, 4, 2, resolution=(4, 5))(torch.randn(1, 16, 8))
    with pytest.raises(ValueError, match=r"\(B, 9, 8\)"):
        TimmTinyVitAttention(8, 4, 2, resolution=(3, 3))(torch.randn(1, 9, 6))
    with pytest.raises(ValueError, match="attn_ratio \\* key_dim must be >= 1"):
        TimmEfficientFormerAttention(8, 4, 2, attn_ratio=0.2)
    with pytest.raises(ValueError, match="resolution must be an int or a pair"):
        TimmTinyVitAttention(8, 4, 2, resolution=(3, 3, 3))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        TimmLevitAttentionDownsample(8, 8, 4, 2, stride=0)
    with pytest.raises(TypeError, match="act_layer must be an nn.Module class"):
        TimmLevitAttention(8, 4, 2, act_layer="hard_swish")  # type: ignore[arg-type]
