"""fightingcv's `HaloAttention` -> `FightingcvHaloAttention`: outputs, input gradients and weights
equal fightingcv's in float64 within 1e-10 over many configurations; its intended (un-inverted) mask
equals the canonical `HaloAttention(mask_padding=True)`; the errors where fightingcv asserts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _parity import TOL, D, check_same, randomize, x_of
from torch.overrides import TorchFunctionMode

import attnzoo
from attnzoo import HaloAttention
from attnzoo.convert import convert, from_fightingcv
from attnzoo.mechanisms.halo_fightingcv import FightingcvHaloAttention

halo_module = pytest.importorskip(
    "fightingcv_attention.attention.HaloAttention", reason="fightingcv-attention is needed for parity"
)
Theirs = halo_module.HaloAttention

CASES = [
    # (dim, heads, dim_head, block_size, halo_size, input shape)
    (6, 2, 3, 2, 1, (2, 6, 8, 6)),  # interior blocks, non-square
    (16, 4, 5, 3, 2, (1, 16, 9, 12)),  # odd block, halo 2
    (8, 1, 4, 1, 1, (2, 8, 3, 4)),  # one-pixel blocks
    (12, 3, 4, 4, 1, (3, 12, 4, 8)),  # every block touches the border
    (10, 2, 6, 2, 3, (2, 10, 6, 10)),  # halo wider than the block: every window leaves the map
    (32, 8, 8, 4, 2, (1, 32, 16, 16)),  # 2 x 2 interior blocks of 4 x 4
    (5, 1, 7, 2, 1, (1, 5, 2, 2)),  # one block, odd width
    (16, 8, 64, 2, 1, (2, 16, 6, 6)),  # fightingcv's default dim_head and heads
    (24, 6, 2, 3, 1, (4, 24, 9, 6)),  # batch 4
]
IDS = [f"dim{c[0]}-h{c[1]}-d{c[2]}-b{c[3]}-halo{c[4]}-{'x'.join(map(str, c[5]))}" for c in CASES]


def build(case: tuple) -> torch.nn.Module:
    dim, heads, dim_head, block, halo, _ = case
    return randomize(Theirs(dim=dim, block_size=block, halo_size=halo, dim_head=dim_head, heads=heads))


class Spy(TorchFunctionMode):
    """Records every softmax fightingcv takes; with `fix_mask`, inverts the mask of its in-place
    `masked_fill_`, so that it masks the padding as it means to."""

    def __init__(self, fix_mask: bool = False) -> None:
        super().__init__()
        self.fix_mask, self.softmax = fix_mask, []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if self.fix_mask and func is torch.Tensor.masked_fill_:
            args = (args[0], ~args[1], *args[2:])
        out = func(*args, **kwargs)
        if func is torch.Tensor.softmax:
            self.softmax.append(out.detach())
        return out


def their_weights(spy: Spy, case: tuple) -> torch.Tensor:
    """fightingcv's `((B nb) h, L, S)` softmax as `(B, h, nb, L, S)`."""
    (attn,) = spy.softmax
    batch, heads = case[5][0], case[1]
    attn = attn.reshape(batch, -1, heads, *attn.shape[1:])  # (B, nb, h, L, S)
    return attn.transpose(1, 2)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_and_input_gradients_match(case, train):
    theirs = build(case)
    ours = from_fightingcv(theirs)
    assert type(ours) is FightingcvHaloAttention
    check_same(theirs, ours, case[5], train)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_weights_match(case):
    """The weights (the border blocks' softmax of the relative logits over the padding included)."""
    theirs = build(case)
    ours = from_fightingcv(theirs).eval()
    x = x_of(*case[5])
    with Spy() as spy:
        theirs(x)
    y, weights = ours(x, need_weights=True)
    torch.testing.assert_close(weights, their_weights(spy, case), **TOL)
    torch.testing.assert_close(y, ours(x), atol=1e-12, rtol=0)


def test_what_fightingcv_computes():
    """Inside blocks average their window's values uniformly; border blocks give the bias."""
    theirs = build(CASES[0])  # 6 channels, 2 x 3 heads, blocks of 2, halo 1, (2, 6, 8, 6)
    ours = from_fightingcv(theirs)
    x = x_of(2, 6, 8, 6)
    y = ours(x)
    values = F.conv2d(x, ours.kv.weight).reshape(2, 2, 6, 8, 6)[:, :, 3:].reshape(2, 6, 8, 6)  # (B, h*d, ..)
    window = values[:, :, 1:5, 1:5].mean((2, 3))  # block (1, 1): rows 2-3, columns 2-3
    expected = window @ theirs.to_out.weight.T + theirs.to_out.bias  # (B, C)
    torch.testing.assert_close(y[:, :, 2:4, 2:4], expected[:, :, None, None].expand(2, 6, 2, 2), **TOL)
    bias = theirs.to_out.bias.reshape(1, 6, 1, 1).expand(2, 6, 2, 6)
    torch.testing.assert_close(y[:, :, :2], bias, atol=0, rtol=0)
    torch.testing.assert_close(theirs(x), y, **TOL)


@pytest.mark.parametrize("case", CASES[:6], ids=IDS[:6])
def test_the_mask_fightingcv_means_is_mask_padding(case):
    """fightingcv with its mask inverted back (padding masked) equals the canonical class with
    `mask_padding=True`, fightingcv's widths and `scale_pos_embed=True`, followed by its `to_out`:
    the relative tables map onto `height_rel` / `width_rel` as they are."""
    theirs = build(case)
    converted = from_fightingcv(theirs)
    dim, heads, dim_head, block, halo, shape = case
    canonical = HaloAttention(dim, out_channels=heads * dim_head, num_heads=heads, head_dim=dim_head,
                              block_size=block, halo_size=halo, scale_pos_embed=True, mask_padding=True,
                              dtype=D)
    state = {k: v for k, v in converted.state_dict().items() if not k.startswith("proj.")}
    canonical.load_state_dict(state, strict=True)
    xa, xb = x_of(*shape).requires_grad_(), x_of(*shape).requires_grad_()
    with Spy(fix_mask=True) as spy:
        y_theirs = theirs(xa)
    y, weights = canonical(xb, need_weights=True)
    y = F.conv2d(y, converted.proj.weight, converted.proj.bias)
    torch.testing.assert_close(y, y_theirs, **TOL)
    torch.testing.assert_close(weights, their_weights(spy, case), **TOL)
    g = torch.randn_like(y)
    y.backward(g)
    y_theirs.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, **TOL)


def test_convert_dispatches_and_copies():
    theirs = build(CASES[0]).train()
    ours = convert(theirs)
    assert type(ours) is FightingcvHaloAttention and ours.training and ours.q.weight.dtype == D
    assert (ours.num_heads, ours.head_dim, ours.block_size, ours.halo_size) == (2, 3, 2, 1)
    with torch.no_grad():
        ours.q.weight.zero_()
    assert theirs.to_q.weight.abs().sum() > 0


def test_errors_where_fightingcv_asserts():
    theirs = build(CASES[0])  # dim 6, block 2
    ours = from_fightingcv(theirs)
    for shape, message in [((1, 6, 5, 6), "block_size"), ((1, 6, 6, 7), "block_size"), ((1, 7, 6, 6), "C=6")]:
        with pytest.raises(AssertionError):
            theirs(x_of(*shape))
        with pytest.raises(ValueError, match=message):
            ours(x_of(*shape))
    with pytest.raises(AssertionError, match="halo size"):
        Theirs(dim=6, block_size=2, halo_size=0)


def test_refuses_modules_it_cannot_represent():
    theirs = build(CASES[0])
    theirs.to_q = torch.nn.Linear(6, 6, bias=True, dtype=D)
    with pytest.raises(TypeError, match="to_q .*bias"):
        from_fightingcv(theirs)
    theirs = build(CASES[0])
    theirs.rel_pos_emb.rel_width = torch.nn.Parameter(torch.zeros(5, 3, dtype=D))
    with pytest.raises(TypeError, match="rel_width"):
        from_fightingcv(theirs)


def test_direct_construction_and_canonical_defaults():
    m = FightingcvHaloAttention(16, num_heads=2, head_dim=4, block_size=2, halo_size=1)
    assert m.out_channels == 8 and m.proj.in_channels == 8 and m.proj.out_channels == 16
    assert m(torch.randn(1, 16, 6, 4)).shape == (1, 16, 6, 4)
    assert not attnzoo.create("halo", 16).mask_padding
