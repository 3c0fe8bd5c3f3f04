"""timm's differential attention (`DiffAttention`, ViT's `attn_layer='diff'`) against timm's module: float64
outputs and every gradient (masks, causal, dropout under one seed), keys both ways, the float32 lambda,
the map capture, and whole models after `replace`."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms.test_timm_vit_variants import _same

import attnzoo
from attnzoo.compat import TimmDiffAttention
from attnzoo.convert import from_timm

timm = pytest.importorskip("timm", reason="timm missing")
from timm.layers.diff_attention import DiffAttention  # noqa: E402

D = torch.float64

CASES = [
    {"dim": 16, "num_heads": 2},
    {"dim": 24, "num_heads": 3, "qkv_bias": True, "depth": 5, "attn_drop": 0.3, "proj_drop": 0.2},
    {"dim": 16, "num_heads": 4, "dual_lambda": True, "qk_norm": True, "scale_norm": True, "proj_bias": False},
    {"dim": 8, "num_heads": 1, "depth": 2, "dual_lambda": True, "attn_drop": 0.5},
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kwargs", CASES)
def test_matches_timm(kwargs, train):
    theirs = randomize(DiffAttention(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmDiffAttention and set(ours.state_dict()) == set(theirs.state_dict())
    assert ours.lambda_init == theirs.lambda_init
    _same(theirs, ours, torch.randn(2, 7, kwargs["dim"], dtype=D))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    fresh = TimmDiffAttention(**kwargs).double()
    fresh.load_state_dict(theirs.state_dict(), strict=True)  # timm's checkpoint into a built module


# timm's default path hands mask and is_causal to SDPA, which refuses the two together
@pytest.mark.parametrize(("mask_kind", "is_causal"), [("none", False), ("none", True), ("bool", False),
                                                     ("float", False)])
def test_masks_match_timm(mask_kind, is_causal):
    theirs = randomize(DiffAttention(12, num_heads=3, depth=1).double())
    ours = from_timm(theirs)
    gen = torch.Generator().manual_seed(4)
    mask = {
        "none": None,
        "bool": torch.rand(2, 3, 6, 6, generator=gen) > 0.3,  # per head
        "float": torch.randn(2, 1, 6, 6, generator=gen, dtype=D),  # shared by the heads
    }[mask_kind]
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True  # no fully masked query: timm gives NaN there, attnzoo zeros
    x = torch.randn(2, 6, 12, dtype=D, requires_grad=True)
    want = theirs(x, attn_mask=mask, is_causal=is_causal)
    got = ours(x, attn_mask=mask, is_causal=is_causal)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(got)
    for g, w in zip(torch.autograd.grad(got, [x, *ours.parameters()], grad),
                    torch.autograd.grad(want, [x, *theirs.parameters()], grad), strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


def test_fully_masked_query_gives_zeros_not_nan():
    module = TimmDiffAttention(8, num_heads=2).double()
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 2, :] = False
    x = torch.randn(1, 4, 8, dtype=D, requires_grad=True)
    out = module(x, attn_mask=mask)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_vector_lambda_is_float32_rounded_as_timm():
    module = TimmDiffAttention(8, num_heads=2).double()
    with torch.no_grad():
        module.lambda_q1.fill_(0.1 + 1e-12)
    exact = torch.exp((module.lambda_q1 * module.lambda_k1).sum()) - torch.exp(
        (module.lambda_q2 * module.lambda_k2).sum()) + module.lambda_init
    got = module.lambda_full()
    assert got.dtype == torch.float32
    assert (got.double() - exact).abs().item() < 1e-6


def test_bfloat16_module_keeps_float32_lambdas():
    theirs = DiffAttention(16, num_heads=2, dtype=torch.bfloat16)
    assert theirs.lambda_q1.dtype == torch.float32  # timm's choice
    ours = from_timm(theirs)
    assert ours.qkv.weight.dtype == torch.bfloat16 and ours.lambda_q1.dtype == torch.float32
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)


def test_capture_records_the_differential_rows():
    module = randomize(TimmDiffAttention(12, num_heads=3, depth=3)).eval()
    x = torch.randn(2, 5, 12, dtype=D)
    with attnzoo.capture_maps(module, queries=[(4,), (0,), (2,)]) as maps:
        module(x)
    (record,) = maps[next(iter(maps))]
    q, k, _ = module.qkv(x).chunk(3, dim=2)
    q = module.q_norm(q.reshape(2, 5, 6, 2).transpose(1, 2)).unflatten(1, (3, 2))
    k = module.k_norm(k.reshape(2, 5, 6, 2).transpose(1, 2)).unflatten(1, (3, 2))
    maps_ = (q * module.scale) @ k.transpose(-2, -1)  # (B, h, 2, N, N)
    probs = maps_.softmax(-1)
    want = probs[:, :, 0] - module.lambda_full().double() * probs[:, :, 1]
    assert record.queries.tolist() == [4, 0, 2]
    torch.testing.assert_close(record.data, want[:, :, [4, 0, 2]].detach(), atol=1e-12, rtol=1e-12)
    assert record.meta["differential"] is True


def test_errors_where_timm_fails():
    with pytest.raises(ValueError, match="2 \\* num_heads"):
        TimmDiffAttention(12, num_heads=4)  # timm: head_dim 1, its reshape fails
    with pytest.raises(ValueError, match="C=16"):
        TimmDiffAttention(16, num_heads=2)(torch.randn(1, 3, 12))
    with pytest.raises(ValueError, match="attn_mask"):
        TimmDiffAttention(16, 2)(torch.randn(1, 3, 16), attn_mask=torch.ones(3, 4, dtype=torch.bool))


@pytest.mark.parametrize("arch", ["vit_dwee_patch16_reg1_gap_256"])
def test_whole_model_keeps_its_logits_and_checkpoint(arch):
    model = randomize(timm.create_model(arch, pretrained=False, num_classes=3, img_size=64), seed=3).eval()
    reference = copy.deepcopy(model)
    names = attnzoo.replace(model, DiffAttention)
    assert len(names) == 14 and all(type(model.get_submodule(n)) is TimmDiffAttention for n in names)
    # depth-dependent lambda_init carried over, block by block
    assert [model.get_submodule(n).lambda_init for n in names] == [
        reference.get_submodule(n).lambda_init for n in names]
    x = torch.randn(2, 3, 64, 64, dtype=D)
    with torch.no_grad():
        want = reference(x)
        torch.testing.assert_close(model(x), want, atol=1e-10 * want.abs().max().item(), rtol=1e-10)
    model.load_state_dict(reference.state_dict(), strict=True)


@pytest.mark.parametrize("mask", [None, "shared"])
def test_timms_other_path_draws_one_dropout_mask_over_both_maps(mask):
    """timm with `fused_attn=False` (TIMM_FUSED_ATTN=0) drops the 2h maps together; the flag is copied."""
    theirs = randomize(DiffAttention(16, num_heads=2, attn_drop=0.4).double()).train()
    theirs.fused_attn = False
    ours = from_timm(theirs)
    assert ours.fused_attn is False
    x = torch.randn(2, 5, 16, dtype=D)
    attn_mask = None if mask is None else torch.randn(1, 1, 5, 5, dtype=D)  # timm's path: shared by heads
    torch.manual_seed(7)
    want = theirs(x, attn_mask=attn_mask)
    torch.manual_seed(7)
    torch.testing.assert_close(ours(x, attn_mask=attn_mask), want, atol=1e-10, rtol=1e-10)


def test_set_lambda_init_as_timm():
    theirs, ours = DiffAttention(8, num_heads=2), TimmDiffAttention(8, num_heads=2)
    theirs.set_lambda_init(7)
    ours.set_lambda_init(7)
    assert ours.lambda_init == theirs.lambda_init


def test_built_in_bfloat16_keeps_float32_lambdas_and_timms_numbers():
    theirs = DiffAttention(16, num_heads=2, dtype=torch.bfloat16)
    ours = TimmDiffAttention(16, num_heads=2, dtype=torch.bfloat16)
    assert ours.lambda_q1.dtype == torch.float32 and ours.qkv.weight.dtype == torch.bfloat16
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)


@pytest.mark.parametrize("value", ["no", 1, None])
def test_is_causal_takes_bools_as_timms_sdpa_call_does(value):
    """`is_causal="no"` was taken as causal; timm's default path refuses it (SDPA's bool argument)."""
    from attnzoo.compat import TimmAttention, TimmEvaAttention

    x = torch.randn(1, 4, 8)
    for module in (TimmDiffAttention(8, 2), TimmAttention(8, 2), TimmEvaAttention(8, 2, scale_norm=False)):
        with pytest.raises(TypeError, match="is_causal must be a bool"):
            module(x, is_causal=value)
