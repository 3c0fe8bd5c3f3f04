"""timm's Swin V2 CR window attention as `attnzoo.compat.TimmWindowMultiHeadAttention`: float64 parity
with timm (with and without the shift mask, the meta network's and the attention's dropout draws in
training), the offset table, a whole `SwinTransformerV2Cr` swapped by `attnzoo.replace` with its
logits, checkpoint and maps, `set_window_size`, and errors."""

from __future__ import annotations

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap

from attnzoo.compat import TimmWindowMultiHeadAttention
from attnzoo.convert import from_timm

cr = pytest.importorskip("timm.models.swin_transformer_v2_cr", reason="timm missing")
D = torch.float64


@pytest.mark.parametrize("kwargs", [
    {"dim": 16, "num_heads": 2, "window_size": (2, 3)},
    {"dim": 12, "num_heads": 3, "window_size": (3, 3), "meta_hidden_dim": 8},
    {"dim": 16, "num_heads": 4, "window_size": (2, 2), "drop_attn": 0.3, "drop_proj": 0.2},
])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_timm_float64(kwargs: dict, train: bool, masked: bool) -> None:
    theirs = randomize(cr.WindowMultiHeadAttention(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmWindowMultiHeadAttention and ours.training == train
    n = kwargs["window_size"][0] * kwargs["window_size"][1]
    x = torch.randn(6, n, kwargs["dim"], dtype=D, requires_grad=True)  # 2 images of 3 windows
    regions = torch.rand(3, n, n, generator=torch.Generator().manual_seed(0)) > 0.5
    mask = regions.to(D) * -100 if masked else None  # timm's 0 / -100 per window
    torch.manual_seed(1)
    want = theirs(x, mask)
    torch.manual_seed(1)  # the meta network's and the attention's dropout draws, in timm's order
    got = ours(x, mask)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(got)
    wanted = torch.autograd.grad(want, [x, *theirs.parameters()], grad)
    for g, w in zip(torch.autograd.grad(got, [x, *ours.parameters()], grad), wanted, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


def test_offsets_and_window_change_are_timms() -> None:
    theirs = cr.WindowMultiHeadAttention(8, 2, (3, 4))
    ours = from_timm(theirs)
    assert torch.equal(ours.relative_coordinates_log, theirs.relative_coordinates_log)
    theirs.set_window_size((2, 5))
    ours.set_window_size((2, 5))
    assert torch.equal(ours.relative_coordinates_log, theirs.relative_coordinates_log)
    x = torch.randn(2, 10, 8)
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_replace_in_a_timm_swin_v2_cr_keeps_logits_checkpoint_and_maps() -> None:
    model = cr.SwinTransformerV2Cr(img_size=(32, 32), patch_size=4, window_size=4, embed_dim=16,
                                   depths=(2, 1), num_heads=(2, 2), num_classes=3,
                                   attn_drop_rate=0.2).double()
    # the meta networks' dropout (timm's 0.125) and the attention's draw timm's masks in training
    check_swap(model, [cr.WindowMultiHeadAttention], torch.randn(2, 3, 32, 32, dtype=D), 3, seed=5)


def test_errors_name_what_was_expected() -> None:
    attn = TimmWindowMultiHeadAttention(8, 2, (2, 2))
    with pytest.raises(ValueError, match=r"\(B, 4, 8\)"):
        attn(torch.randn(3, 5, 8))
    with pytest.raises(ValueError, match="nW dividing"):
        attn(torch.randn(3, 4, 8), torch.zeros(2, 4, 4))
    with pytest.raises(TypeError, match="float tensor"):
        attn(torch.randn(3, 4, 8), torch.zeros(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        TimmWindowMultiHeadAttention(10, 3, (2, 2))
