"""timm's MaxViT / CoAtNet attention as `attnzoo.compat.TimmMaxxvitAttention2d` and
`TimmMaxxvitAttentionCl`: float64 parity with timm (both qkv layouts, the three relative position
classes, expansion in qkv or proj, dropout, non-square windows), timm's other (unfused) path and
`shared_rel_pos`, whole MaxViT (window and grid partitions, channels-last and NCHW, parallel) and
CoAtNet models swapped by `attnzoo.replace` with their logits, checkpoints and maps, the recorded
rows against the definition, timm's untiled heads, and errors."""

from __future__ import annotations

import copy
import dataclasses
from functools import partial

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap
from torch import nn

import attnzoo
from attnzoo.compat import TimmMaxxvitAttention2d, TimmMaxxvitAttentionCl
from attnzoo.convert import from_timm

mx = pytest.importorskip("timm.models.maxxvit", reason="timm missing")
rel = pytest.importorskip("timm.layers.pos_embed_rel", reason="timm missing")
D = torch.float64
WINDOW = (3, 5)
REL = {None: None, "bias": lambda: partial(rel.RelPosBias, window_size=WINDOW),
       "mlp": lambda: partial(rel.RelPosMlp, window_size=WINDOW, hidden_dim=16),
       "bias_tf": lambda: partial(rel.RelPosBiasTf, window_size=WINDOW)}
CONFIGS = [  # (rel_pos, constructor arguments)
    (None, {"dim": 16, "dim_head": 8}),
    ("bias", {"dim": 16, "dim_head": 4}),
    ("bias_tf", {"dim": 16, "dim_out": 24, "dim_head": 8, "head_first": False}),  # TF's layout, wider qkv
    ("mlp", {"dim": 16, "dim_out": 32, "dim_head": 8, "expand_first": False, "bias": False}),  # wider proj
    ("bias", {"dim": 16, "dim_out": 8, "dim_head": 8}),  # narrower: qkv at dim in both classes
    ("mlp", {"dim": 16, "dim_head": 4, "attn_drop": 0.3, "proj_drop": 0.2}),  # RelPosMlp's dropout too
    (None, {"dim": 12, "dim_head": 4, "head_first": False, "attn_drop": 0.5}),
]
KINDS = {"2d": (lambda: mx.Attention2d, TimmMaxxvitAttention2d, lambda c: (2, c, *WINDOW)),
         "cl": (lambda: mx.AttentionCl, TimmMaxxvitAttentionCl, lambda c: (2, *WINDOW, c))}


def _pair(kind: str, rel_pos: str | None, kwargs: dict, train: bool) -> tuple[nn.Module, nn.Module]:
    factory = REL[rel_pos]
    theirs = randomize(KINDS[kind][0]()(rel_pos_cls=factory() if factory else None, **kwargs).double())
    ours = from_timm(theirs.train(train))
    assert type(ours) is KINDS[kind][1] and ours.training == train
    return theirs, ours


def _same_grads(want: torch.Tensor, got: torch.Tensor, x: torch.Tensor, theirs: nn.Module,
                ours: nn.Module) -> None:
    grad = torch.randn_like(got)
    wanted = torch.autograd.grad(want, [x, *theirs.parameters()], grad)
    for g, w in zip(torch.autograd.grad(got, [x, *ours.parameters()], grad), wanted, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(("rel_pos", "kwargs"), CONFIGS)
@pytest.mark.parametrize("kind", ["2d", "cl"])
@pytest.mark.parametrize("train", [False, True])
def test_matches_timm_float64(rel_pos: str | None, kwargs: dict, kind: str, train: bool) -> None:
    theirs, ours = _pair(kind, rel_pos, kwargs, train)
    assert [n for n, _ in ours.state_dict().items()] == [n for n, _ in theirs.state_dict().items()]
    x = torch.randn(KINDS[kind][2](kwargs["dim"]), dtype=D, requires_grad=True)
    torch.manual_seed(1)
    want = theirs(x)
    torch.manual_seed(1)  # the same dropout draws (RelPosMlp's hidden dropout, then the attention's)
    got = ours(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    _same_grads(want, got, x, theirs, ours)


@pytest.mark.parametrize(("rel_pos", "kwargs"), [CONFIGS[0], CONFIGS[1], CONFIGS[5]])
@pytest.mark.parametrize("kind", ["2d", "cl"])
def test_timms_unfused_path_and_shared_rel_pos_agree(rel_pos: str | None, kwargs: dict, kind: str) -> None:
    """timm's other path (`fused_attn=False`) gives the same numbers, dropout draws included, and a float
    `shared_rel_pos` is added without `rel_pos` and ignored with it, in both of timm's paths."""
    theirs, ours = _pair(kind, rel_pos, kwargs, True)
    heads = ours.num_heads
    shared = torch.randn(1, heads, 15, 15, dtype=D)
    x = torch.randn(KINDS[kind][2](kwargs["dim"]), dtype=D)
    for fused in (True, False):
        theirs.fused_attn = fused
        torch.manual_seed(2)
        want = theirs(x, shared_rel_pos=shared)
        torch.manual_seed(2)
        torch.testing.assert_close(ours(x, shared_rel_pos=shared), want, atol=1e-10, rtol=1e-10)
    ours.eval()
    ignored = torch.testing.assert_close if rel_pos else _differ
    ignored(ours(x, shared_rel_pos=shared), ours(x))


def _differ(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() > 1e-3


def test_bool_shared_rel_pos_is_a_mask_as_in_timms_fused_path() -> None:
    theirs, ours = _pair("cl", None, {"dim": 16, "dim_head": 8}, False)
    keep = torch.rand(15, 15, generator=torch.Generator().manual_seed(0)) > 0.5
    keep |= torch.eye(15, dtype=torch.bool)
    x = torch.randn(2, 1, 15, 16, dtype=D)  # tokens as a 1 x 15 window
    want = theirs(x, shared_rel_pos=keep)
    torch.testing.assert_close(ours(x, shared_rel_pos=keep), want, atol=1e-10, rtol=1e-10)
    theirs.fused_attn = False  # timm's other path adds it (0 or 1) instead
    _differ(theirs(x, shared_rel_pos=keep), want)


def _model(blocks: tuple, rel_pos: str, nchw: bool = False, tf: bool = False, coat: bool = False,
           img: int = 64, drop: float = 0.0) -> nn.Module:
    """A small MaxxVit: maps 32 -> 16 -> 8 at 64 pixels (MaxViT's 4 x 4 windows and grids)."""
    base = mx._rw_coat_cfg(rel_pos_type=rel_pos) if coat else mx._rw_max_cfg(dim_head=8, rel_pos_type=rel_pos)
    extra = {"expand_first": tf} if coat else {"window_size": (4, 4)}
    base["transformer_cfg"] = dataclasses.replace(base["transformer_cfg"], dim_head=8, use_nchw_attn=nchw,
                                                  head_first=not tf, attn_drop=drop, proj_drop=drop, **extra)
    cfg = mx.MaxxVitCfg(embed_dim=(16, 32), depths=(1, 1), block_type=blocks, stem_width=16, **base)
    return mx.MaxxVit(cfg, img_size=img, num_classes=3).double()


MODELS = {  # (model, swapped modules, the class they become)
    "maxvit": (lambda: _model(("M", "M"), "bias"), 4, TimmMaxxvitAttentionCl),
    "maxvit_nchw_tf": (lambda: _model(("M", "M"), "bias_tf", nchw=True, tf=True), 4, TimmMaxxvitAttention2d),
    "maxvit_parallel_mlp_dropout": (lambda: _model(("PM", "PM"), "mlp", drop=0.2), 4, TimmMaxxvitAttentionCl),
    "coatnet": (lambda: _model(("C", "T"), "bias", coat=True), 1, TimmMaxxvitAttention2d),
    "coatnet_mlp_expand_first_dropout": (
        lambda: _model(("T", "T"), "mlp", coat=True, tf=True, img=32, drop=0.3), 2, TimmMaxxvitAttention2d),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_replace_in_a_timm_maxxvit_keeps_logits_checkpoint_and_maps(name: str) -> None:
    build, swapped, cls = MODELS[name]
    model = build()
    x = torch.randn(2, 3, model.img_size[0], model.img_size[1], dtype=D)
    model = check_swap(model, [mx.Attention2d, mx.AttentionCl], x, swapped)
    ours = (TimmMaxxvitAttention2d, TimmMaxxvitAttentionCl)
    names = [n for n, m in model.named_modules() if isinstance(m, ours)]
    assert len(names) == swapped and all(type(model.get_submodule(n)) is cls for n in names)
    assert all(p.grad is not None for n in names for p in model.get_submodule(n).parameters())


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's table interpolation warns about torch's indexing
def test_set_input_size_resizes_the_copied_rel_pos_as_timms() -> None:
    theirs = randomize(_model(("M", "M"), "bias"), seed=5).eval()
    ours = copy.deepcopy(theirs)
    attnzoo.replace(ours, mx.AttentionCl)
    for model in (theirs, ours):  # the relative position tables are resized to 2 x 2 windows
        model.set_input_size(img_size=(32, 32), window_size=(2, 2))
    x = torch.randn(2, 3, 32, 32, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("rel_pos", ["bias", "bias_tf"])
def test_rows_follow_the_definition(rel_pos: str) -> None:
    attn = randomize(TimmMaxxvitAttention2d(8, dim_head=4, rel_pos_cls=REL[rel_pos]()).double()).eval()
    x = torch.randn(1, 8, *WINDOW, dtype=D)
    with attnzoo.capture_maps(attn, queries=[(2, 3)]) as maps:
        attn(x)
    (rec,) = maps[next(iter(maps))]
    assert rec.grid == WINDOW and rec.queries.tolist() == [13] and rec.data.shape == (1, 2, 1, 15)
    qkv = attn.qkv(x).reshape(1, 2, 3, 4, 15)  # per head [q k v], each (d, N)
    q, k = qkv[:, :, 0, :, 13:14].transpose(-1, -2), qkv[:, :, 1]
    bias = attn.rel_pos.get_bias().reshape(1, 2, 15, 15)[:, :, 13:14]
    torch.testing.assert_close(rec.data, (q @ k / 2.0 + bias).softmax(-1), atol=1e-12, rtol=1e-12)


def test_untiled_heads_are_refused_where_timms_attention2d_goes_wrong() -> None:
    theirs = mx.Attention2d(48, dim_head=32).double()  # one head of 32 in a width of 48
    assert theirs(torch.randn(1, 48, 4, 4, dtype=D)).shape == (1, 48, 4, 4)  # runs, on wrong "tokens"
    with pytest.raises(RuntimeError):
        theirs(torch.randn(1, 48, 3, 3, dtype=D))
    with pytest.raises(TypeError, match="cannot convert Attention2d: its 1 heads of dim_head 32 do not tile"):
        from_timm(theirs)
    with pytest.raises(ValueError, match="width 48 .* divisible by dim_head=32"):
        TimmMaxxvitAttention2d(48, dim_head=32)
    with pytest.raises(AssertionError):
        mx.AttentionCl(48, dim_head=32)  # timm asserts here
    with pytest.raises(ValueError, match=r"width 24 \(dim_out\) must be divisible by dim_head=16"):
        TimmMaxxvitAttentionCl(16, 24, dim_head=16)


def test_errors_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        TimmMaxxvitAttention2d(8, dim_head=4)(torch.randn(1, 6, 3, 3))
    with pytest.raises(ValueError, match=r"\(B, H, W, 8\) with C=8"):
        TimmMaxxvitAttentionCl(8, dim_head=4)(torch.randn(1, 3, 3, 6))
    tokens = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"\(B, H, W, 8\) \(4-D, MaxViT's windows\), got \(2, 5, 8\).*unsq"):
        TimmMaxxvitAttentionCl(8, dim_head=4)(tokens)  # timm's takes it: the same numbers as a 1 x N window
    theirs = randomize(mx.AttentionCl(8, dim_head=4))
    torch.testing.assert_close(from_timm(theirs)(tokens.double().unsqueeze(1)).squeeze(1),
                               theirs(tokens.double()), atol=1e-12, rtol=1e-12)
    attn = TimmMaxxvitAttentionCl(8, dim_head=4, rel_pos_cls=partial(rel.RelPosBias, window_size=(2, 2)))
    with pytest.raises(ValueError, match=r"rel_pos.get_bias\(\) .*broadcastable to \(1, 2, 9, 9\)"):
        attn(torch.randn(1, 3, 3, 8))  # a 3 x 3 window for a bias of 2 x 2
    with pytest.raises(ValueError, match=r"shared_rel_pos broadcastable to \(1, 2, 4, 4\)"):
        TimmMaxxvitAttention2d(8, dim_head=4)(torch.randn(1, 8, 2, 2), torch.randn(2, 5, 5))
    with pytest.raises(TypeError, match="shared_rel_pos"):
        TimmMaxxvitAttention2d(8, dim_head=4)(torch.randn(1, 8, 2, 2), torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="dim_head must be >= 1"):
        TimmMaxxvitAttentionCl(8, dim_head=0)
    theirs = mx.AttentionCl(8, dim_head=4)
    theirs.scale = 0.1
    with pytest.raises(TypeError, match="cannot convert AttentionCl: its scale"):
        from_timm(theirs)
    other = mx.Attention2d(8, dim_head=4)
    other.qkv = nn.Conv2d(8, 24, 3, padding=1)
    with pytest.raises(TypeError, match="cannot convert Attention2d: its qkv is not timm's 1x1"):
        from_timm(other)
    other = mx.Attention2d(8, dim_head=4)
    other.rel_pos = nn.Identity()
    with pytest.raises(TypeError, match="its rel_pos is a Identity, whose forward is not that of timm's"):
        from_timm(other)
