"""timm's EVA attention as `attnzoo.compat.TimmEvaAttention`: float64 parity with timm (fused and
separate projections, q/v biases, rotary embedding interleaved and half, prefix tokens, q/k and scale
norms, gate, masks, dropout), a whole EVA swapped by `attnzoo.replace` with its logits, checkpoint and
maps, and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap
from torch import nn

from attnzoo.compat import TimmEvaAttention
from attnzoo.convert import from_timm

eva = pytest.importorskip("timm.models.eva", reason="timm missing")
D = torch.float64
TOKENS = 7

CONFIGS = [
    {"dim": 16, "num_heads": 2, "scale_norm": False},
    {"dim": 16, "num_heads": 4, "norm_layer": nn.LayerNorm},  # timm's default scale norm
    {"dim": 12, "num_heads": 3, "qkv_fused": False, "norm_layer": nn.LayerNorm, "qk_norm": True},
    {"dim": 16, "num_heads": 2, "qkv_bias": False, "rotate_half": True, "num_prefix_tokens": 0,
     "scale_norm": False, "gated": True},
    {"dim": 16, "num_heads": 2, "qkv_bias_separate": True, "num_prefix_tokens": 3, "attn_head_dim": 6,
     "scale_norm": False},
    {"dim": 16, "num_heads": 2, "attn_drop": 0.3, "proj_drop": 0.2, "norm_layer": nn.LayerNorm},
]


def _rope(kwargs: dict) -> torch.Tensor:
    head_dim = kwargs.get("attn_head_dim") or kwargs["dim"] // kwargs["num_heads"]
    rotated = TOKENS - kwargs.get("num_prefix_tokens", 1)
    return torch.randn(rotated, 2 * head_dim, dtype=D)  # [sin | cos]; any values test the algebra


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("with_rope", [False, True])
def test_matches_timm_float64(kwargs: dict, train: bool, with_rope: bool) -> None:
    theirs = randomize(eva.EvaAttention(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmEvaAttention and ours.training == train
    x = torch.randn(2, TOKENS, kwargs["dim"], dtype=D, requires_grad=True)
    rope = _rope(kwargs) if with_rope else None
    if kwargs.get("attn_head_dim"):  # timm reshapes the heads to dim and fails: ours runs
        with pytest.raises(RuntimeError):
            theirs(x, rope=rope)
        assert ours(x, rope=rope).shape == x.shape
        return
    torch.manual_seed(1)
    want = theirs(x, rope=rope)
    torch.manual_seed(1)
    got = ours(x, rope=rope)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(got)
    wanted = torch.autograd.grad(want, [x, *theirs.parameters()], grad)
    for g, w in zip(torch.autograd.grad(got, [x, *ours.parameters()], grad), wanted, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "causal"])
def test_masks_match_timm(mask_kind: str) -> None:
    theirs = randomize(eva.EvaAttention(16, 2, scale_norm=False).double()).eval()
    ours = from_timm(theirs)
    x = torch.randn(2, TOKENS, 16, dtype=D)
    rope = _rope({"dim": 16, "num_heads": 2})
    keep = torch.rand(TOKENS, TOKENS, generator=torch.Generator().manual_seed(0)) > 0.4
    keep |= torch.eye(TOKENS, dtype=torch.bool)  # no fully masked row (timm gives NaN there)
    call = {"bool": {"attn_mask": keep}, "float": {"attn_mask": torch.randn(2, 1, TOKENS, TOKENS, dtype=D)},
            "causal": {"is_causal": True}}[mask_kind]
    want = theirs(x, rope=rope, **call)
    torch.testing.assert_close(ours(x, rope=rope, **call), want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dynamic", [False, True])
def test_replace_in_a_timm_eva_keeps_logits_checkpoint_and_maps(dynamic: bool) -> None:
    # a dynamic image size makes timm build its rotary table per call, in float32 whatever the model's dtype
    model = eva.Eva(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                    use_rot_pos_emb=True, ref_feat_shape=(4, 4), scale_attn_inner=True,
                    attn_drop_rate=0.2, dynamic_img_size=dynamic).double()
    randomize(model, seed=4)
    reference = copy.deepcopy(model).eval()
    x = torch.randn(2, 3, 32, 32, dtype=D)
    swapped = check_swap(model, [eva.EvaAttention], x, ["blocks.0.attn", "blocks.1.attn"], randomise=False)
    if dynamic:  # another size: the table follows, in float32, as timm's
        other = torch.randn(1, 3, 40, 24, dtype=D)
        with torch.no_grad():
            torch.testing.assert_close(swapped.eval()(other), reference(other), atol=1e-10, rtol=1e-10)


def test_errors_name_what_was_expected() -> None:
    attn = TimmEvaAttention(8, 2, scale_norm=False)
    with pytest.raises(ValueError, match=r"\(B, N, 8\)"):
        attn(torch.randn(1, 4, 6))
    with pytest.raises(ValueError, match="rope"):
        attn(torch.randn(1, 5, 8), rope=torch.randn(5, 8))  # 4 rotated tokens after the class token
    with pytest.raises(TypeError, match="rope"):
        attn(torch.randn(1, 5, 8), rope=torch.ones(4, 8, dtype=torch.bool))
    for flat in (torch.tensor(0.0), torch.zeros(1), torch.zeros(4, 1)):  # [sin | cos] must be 2 d wide
        with pytest.raises(ValueError, match=r"rope of shape \(\.\.\., N, 8\)"):
            attn(torch.randn(1, 5, 8), rope=flat)
    with pytest.raises(ValueError, match="norm_layer"):
        TimmEvaAttention(8, 2)  # timm's default scale norm needs a norm layer
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        TimmEvaAttention(8, 2, num_prefix_tokens=-1, scale_norm=False)


# timm's AttentionRope (timm.layers.attention): Qwen3-ViT's and DeepSeek ViT's attention

ROPE_CONFIGS = [
    {"dim": 16, "num_heads": 2},
    {"dim": 16, "num_heads": 4, "qkv_fused": False, "num_kv_heads": 2, "qk_norm": True,
     "norm_layer": nn.LayerNorm},
    {"dim": 12, "num_heads": 3, "qkv_fused": False, "num_kv_heads": 1, "qkv_bias": False, "rotate_half": True,
     "num_prefix_tokens": 0, "dim_out": 10, "proj_bias": False},
    {"dim": 16, "num_heads": 2, "scale_norm": True, "norm_layer": nn.LayerNorm, "gated": True,
     "attn_drop": 0.3, "proj_drop": 0.2, "num_prefix_tokens": 2},
]


@pytest.mark.parametrize("kwargs", ROPE_CONFIGS)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("with_rope", [False, True])
def test_rope_attention_matches_timm_float64(kwargs: dict, train: bool, with_rope: bool) -> None:
    from timm.layers.attention import AttentionRope

    from attnzoo.compat import TimmRopeAttention

    theirs = randomize(AttentionRope(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmRopeAttention and ours.training == train
    assert set(ours.state_dict()) == set(theirs.state_dict())
    x = torch.randn(2, TOKENS, kwargs["dim"], dtype=D, requires_grad=True)
    rope = _rope(kwargs) if with_rope else None
    torch.manual_seed(1)
    want = theirs(x, rope=rope)
    torch.manual_seed(1)
    got = ours(x, rope=rope)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(got)
    wanted = torch.autograd.grad(want, [x, *theirs.parameters()], grad)
    for g, w in zip(torch.autograd.grad(got, [x, *ours.parameters()], grad), wanted, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)
    reloaded = TimmRopeAttention(**kwargs).double()
    reloaded.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


def test_rope_attention_refuses_what_timm_asserts() -> None:
    from attnzoo.compat import TimmRopeAttention

    with pytest.raises(ValueError, match="must divide num_heads"):
        TimmRopeAttention(16, 4, qkv_fused=False, num_kv_heads=3)
    with pytest.raises(ValueError, match="needs qkv_fused=False"):
        TimmRopeAttention(16, 4, num_kv_heads=2)


def test_replace_in_a_qwen3_vit_keeps_its_logits_and_checkpoint() -> None:
    timm = pytest.importorskip("timm")
    from timm.layers.attention import AttentionRope

    model = timm.create_model("qwen3_vit_88m", pretrained=False, depth=2, img_size=64, num_classes=3).double()
    randomize(model, seed=5)
    model.eval()
    reference = copy.deepcopy(model)
    assert len(__import__("attnzoo").replace(model, AttentionRope)) == 2
    x = torch.randn(2, 3, 64, 64, dtype=D)
    with torch.no_grad():
        want = reference(x)
        torch.testing.assert_close(model(x), want, atol=1e-10 * want.abs().max().item(), rtol=1e-10)
    model.load_state_dict(reference.state_dict(), strict=True)
