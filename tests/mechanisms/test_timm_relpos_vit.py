"""timm's relative-position ViT attention and SAM's attention as `attnzoo.compat.TimmRelPosAttention` and
`TimmSamAttention`: float64 parity with timm (RelPosBias, RelPosMlp in both modes, RelPosBiasTf, prefix
tokens, shared biases; SAM's decomposed relative positions with the interpolation of its tables, its
rotary embedding; q/k norms and dropout), SAM's position helpers against timm's, whole models swapped by
`attnzoo.replace` with their logits, checkpoints and maps, and errors."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap

from attnzoo.compat import TimmRelPosAttention, TimmSamAttention
from attnzoo.convert import from_timm
from attnzoo.mechanisms.timm_relpos_vit import get_decomposed_rel_pos_bias, get_rel_pos

vr = pytest.importorskip("timm.models.vision_transformer_relpos", reason="timm missing")
vs = pytest.importorskip("timm.models.vision_transformer_sam", reason="timm missing")
rel = pytest.importorskip("timm.layers.pos_embed_rel", reason="timm missing")
from timm.layers import RotaryEmbeddingCat  # noqa: E402

D = torch.float64
TOL = {"atol": 1e-10, "rtol": 1e-10}


def _same(theirs: torch.nn.Module, ours: torch.nn.Module, *args: torch.Tensor, **kwargs: object) -> None:
    """Outputs (under the same seed: the same dropout draws) and the gradients of the first input and of
    every parameter agree."""
    torch.manual_seed(1)
    want = theirs(*args, **kwargs)
    torch.manual_seed(1)
    got = ours(*args, **kwargs)
    torch.testing.assert_close(got, want, **TOL)
    grad = torch.randn_like(got)
    wanted = torch.autograd.grad(want, [args[0], *theirs.parameters()], grad)
    for g, w in zip(torch.autograd.grad(got, [args[0], *ours.parameters()], grad), wanted, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


RELPOS = [  # (RelPosAttention kwargs, tokens)
    ({"dim": 16, "num_heads": 2}, 6),
    ({"dim": 16, "num_heads": 2, "qkv_bias": True, "rel_pos_cls": partial(rel.RelPosBias, window_size=(2, 3)),
      "attn_drop": 0.3, "proj_drop": 0.2}, 6),
    ({"dim": 12, "num_heads": 3, "qk_norm": True,
      "rel_pos_cls": partial(rel.RelPosBias, window_size=(3, 2), prefix_tokens=1)}, 7),
    ({"dim": 16, "num_heads": 4, "rel_pos_cls": partial(rel.RelPosMlp, window_size=(2, 3)), "attn_drop": 0.2},
     6),  # in training, the MLP's own dropout (0.125) draws too
    ({"dim": 16, "num_heads": 2, "qkv_bias": True,
      "rel_pos_cls": partial(rel.RelPosMlp, window_size=(3, 3), mode="swin", prefix_tokens=1)}, 10),
    ({"dim": 16, "num_heads": 2, "rel_pos_cls": partial(rel.RelPosBiasTf, window_size=(2, 3))}, 6),
]


@pytest.mark.parametrize(("kwargs", "tokens"), RELPOS)
@pytest.mark.parametrize("train", [False, True])
def test_relpos_matches_timm_float64(kwargs: dict, tokens: int, train: bool) -> None:
    theirs = randomize(vr.RelPosAttention(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmRelPosAttention and ours.training == train
    assert list(ours.state_dict()) == list(theirs.state_dict())  # timm's keys, in timm's order
    if theirs.rel_pos is not None:  # a copy of timm's module, not the module itself
        assert type(ours.rel_pos) is type(theirs.rel_pos) and ours.rel_pos is not theirs.rel_pos
    x = torch.randn(2, tokens, kwargs["dim"], dtype=D, requires_grad=True)
    _same(theirs, ours, x)


def test_relpos_shared_bias_matches_timm() -> None:
    """A model-wide bias given to the call: added where the module has no rel_pos, ignored where it has."""
    x = torch.randn(2, 6, 16, dtype=D, requires_grad=True)
    for rel_pos_cls in (None, partial(rel.RelPosBias, window_size=(2, 3))):
        theirs = randomize(vr.RelPosAttention(16, 2, rel_pos_cls=rel_pos_cls, attn_drop=0.2).double()).train()
        ours = from_timm(theirs)
        for shared in (torch.randn(1, 2, 6, 6, dtype=D), torch.randn(2, 1, 6, 6, dtype=D)):
            _same(theirs, ours, x, shared_rel_pos=shared)


@pytest.mark.filterwarnings("ignore:torch.searchsorted:UserWarning")  # timm's table resize, inside timm
@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")
@pytest.mark.parametrize("kwargs", [
    {"rel_pos_type": "bias"},
    {"rel_pos_type": "mlp"},
    {"rel_pos_type": "mlp_swin", "class_token": True, "global_pool": "token", "shared_rel_pos": True},
])
def test_replace_in_a_timm_relpos_vit_keeps_logits_checkpoint_maps_and_resize(kwargs: dict) -> None:
    model = vr.VisionTransformerRelPos(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                       num_classes=3, attn_drop_rate=0.2, **kwargs).double()
    randomize(model, seed=4)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, dtype=D)
    check_swap(model, [vr.RelPosAttention], x, ["blocks.0.attn", "blocks.1.attn"], randomise=False)
    assert all(type(b.attn) is TimmRelPosAttention for b in model.blocks)
    # timm's set_input_size resizes each block's rel_pos: the copied modules resize as timm's
    model.eval().set_input_size(img_size=(40, 24))
    reference.eval().set_input_size(img_size=(40, 24))
    wide = torch.randn(2, 3, 40, 24, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(model(wide), reference(wide), **TOL)


def _rope(head_dim: int, feat_shape: tuple[int, int]) -> torch.nn.Module:
    return RotaryEmbeddingCat(head_dim, in_pixels=False, feat_shape=list(feat_shape)).double()


SAM = [  # (Attention kwargs, map sizes to call it on: the tables' own and others, interpolated)
    ({"dim": 16, "num_heads": 2, "use_rel_pos": True, "input_size": (3, 4)}, [(3, 4), (2, 5), (4, 6)]),
    ({"dim": 12, "num_heads": 3, "qkv_bias": False, "qk_norm": True, "use_rel_pos": True,
      "input_size": (2, 2), "attn_drop": 0.3, "proj_drop": 0.2}, [(2, 2), (3, 1)]),
    ({"dim": 16, "num_heads": 2, "qk_norm": True, "attn_drop": 0.2}, [(3, 4), (1, 5)]),
    ({"dim": 16, "num_heads": 2, "rope": (8, (3, 4))}, [(3, 4)]),
]


@pytest.mark.parametrize(("kwargs", "sizes"), SAM)
@pytest.mark.parametrize("train", [False, True])
def test_sam_matches_timm_float64(kwargs: dict, sizes: list, train: bool) -> None:
    if "rope" in kwargs:
        kwargs = {**kwargs, "rope": _rope(*kwargs["rope"])}
    theirs = randomize(vs.Attention(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmSamAttention and ours.training == train
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.rope is theirs.rope  # kept, not copied: timm's blocks share the model's rope
    for height, width in sizes:
        _same(theirs, ours, torch.randn(2, height, width, kwargs["dim"], dtype=D, requires_grad=True))


@pytest.mark.parametrize(("q_size", "k_size", "length"), [
    (4, 4, 7), (4, 4, 5), (3, 5, 9), (5, 3, 13), (2, 7, 7), (6, 4, 3), (7, 3, 1),
])
def test_get_rel_pos_matches_timm(q_size: int, k_size: int, length: int) -> None:
    table = torch.randn(length, 6, dtype=D, requires_grad=True)
    want, got = vs.get_rel_pos(q_size, k_size, table), get_rel_pos(q_size, k_size, table)
    assert got.shape == (q_size, k_size, 6)
    torch.testing.assert_close(got, want, **TOL)
    grad = torch.randn_like(got)  # through the interpolation too
    (got_grad,), (want_grad,) = (torch.autograd.grad(t, table, grad) for t in (got, want))
    torch.testing.assert_close(got_grad, want_grad, **TOL)
    q = torch.randn(3, q_size * 2, 6, dtype=D)
    rows = torch.randn(5, 6, dtype=D)
    sizes = ((q_size, 2), (k_size, 3))
    torch.testing.assert_close(get_decomposed_rel_pos_bias(q, table, rows, *sizes),
                               vs.get_decomposed_rel_pos_bias(q, table, rows, *sizes), **TOL)


@pytest.mark.parametrize("position", ["rel_pos", "rope"])
def test_replace_in_a_timm_sam_keeps_logits_checkpoint_and_maps(position: str) -> None:
    options = {"use_rel_pos": True} if position == "rel_pos" else {"use_rope": True}
    model = vs.VisionTransformerSAM(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                    window_size=2, global_attn_indexes=(1,), num_classes=3, neck_chans=16,
                                    attn_drop_rate=0.2, **options).double()
    randomize(model, seed=4)
    reference = copy.deepcopy(model).eval()
    # the windows of block 0 and the whole map of block 1
    x = torch.randn(2, 3, 64, 64, dtype=D)
    check_swap(model, [vs.Attention], x, ["blocks.0.attn", "blocks.1.attn"], randomise=False)
    model.eval()
    larger = torch.randn(2, 3, 80, 80, dtype=D)  # a 5 x 5 map: windows padded, global tables interpolated
    with torch.no_grad():
        if position == "rel_pos":
            torch.testing.assert_close(model(larger), reference(larger), **TOL)
        else:  # the global rope is built for 4 x 4: both refuse the 5 x 5 map, ours saying why
            assert model.blocks[1].attn.rope is model.rope_global
            with pytest.raises(RuntimeError):
                reference(larger)
            with pytest.raises(ValueError, match=r"rope.get_embed\(\) broadcastable to \(25, 32\)"):
                model(larger)


def test_errors_name_what_was_expected() -> None:
    attn = TimmRelPosAttention(8, 2, rel_pos_cls=partial(rel.RelPosBias, window_size=(2, 2)))
    with pytest.raises(ValueError, match=r"\(B, N, 8\)"):
        attn(torch.randn(1, 4, 6))
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 4, 8\).*got x with N=5"):
        attn(torch.randn(1, 5, 8))
    plain = TimmRelPosAttention(8, 2).eval()
    with pytest.raises(TypeError, match="shared_rel_pos"):
        plain(torch.randn(1, 4, 8), shared_rel_pos=torch.ones(4, 4, dtype=torch.int64))
    # a bool shared_rel_pos is a mask, as timm's fused path hands it to SDPA (MaxViT's stand-ins too)
    x, keep = torch.randn(1, 4, 8), torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    keep |= torch.eye(4, dtype=torch.bool)
    as_bias = torch.zeros(4, 4).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(plain(x, shared_rel_pos=keep), plain(x, shared_rel_pos=as_bias))
    with pytest.raises(ValueError, match="shared_rel_pos"):
        plain(torch.randn(1, 4, 8), shared_rel_pos=torch.zeros(1, 2, 5, 5))
    with pytest.raises(ValueError, match="num_heads=3"):
        TimmRelPosAttention(8, 3)
    sam = TimmSamAttention(8, 2, use_rel_pos=True, input_size=(2, 2))
    with pytest.raises(ValueError, match=r"\(B, H, W, 8\)"):
        sam(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="input_size"):
        TimmSamAttention(8, 2, use_rel_pos=True)
    with pytest.raises(ValueError, match="exclude"):
        TimmSamAttention(8, 2, use_rel_pos=True, input_size=2, rope=_rope(4, (2, 2)))
    with pytest.raises(TypeError, match="get_embed"):
        TimmSamAttention(8, 2, rope=torch.nn.Identity())


def test_unrepresentable_timm_modules_are_refused() -> None:
    class OwnBias(rel.RelPosBias):  # a get_bias of its own: timm's fused and unfused paths differ
        def get_bias(self) -> torch.Tensor:
            return 2 * super().get_bias()

    with pytest.raises(TypeError, match="RelPosAttention.*OwnBias, whose get_bias"):
        from_timm(vr.RelPosAttention(8, 2, rel_pos_cls=partial(OwnBias, window_size=(2, 2))))
    scaled = vr.RelPosAttention(8, 2)
    scaled.scale = 1.0
    with pytest.raises(TypeError, match="scale"):
        from_timm(scaled)
    sam = vs.Attention(8, 2, use_rel_pos=True, input_size=(2, 2))
    sam.rel_pos_h = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(TypeError, match=r"\(4, 3\) rows"):
        from_timm(sam)
