"""timm's CoaT factorized attention as `attnzoo.compat.TimmFactorAttention`: float64 parity with timm
(with its shared convolutional position encoding, whose sharing the conversion keeps), the recorded
rows against the implicit mixing matrix, a whole CoaT swapped by `attnzoo.replace` with its logits,
checkpoint and maps, and errors."""

from __future__ import annotations

import pytest
import torch
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap

import attnzoo
from attnzoo.compat import TimmFactorAttention
from attnzoo.convert import from_timm

coat = pytest.importorskip("timm.models.coat", reason="timm missing")
D = torch.float64


def _timm_attention(dim: int, heads: int, window: int | dict, **kwargs) -> torch.nn.Module:
    crpe = coat.ConvRelPosEnc(head_chs=dim // heads, num_heads=heads, window=window)
    return coat.FactorAttnConvRelPosEnc(dim, heads, shared_crpe=crpe, **kwargs)


@pytest.mark.parametrize(("dim", "heads", "window", "kwargs"), [
    (16, 2, 3, {}),
    (12, 3, {3: 1, 5: 2}, {"qkv_bias": True}),
    (16, 4, {3: 2, 5: 1, 7: 1}, {"qkv_bias": True, "proj_drop": 0.2}),
])
@pytest.mark.parametrize("train", [False, True])
def test_matches_timm_float64(dim: int, heads: int, window: int | dict, kwargs: dict, train: bool) -> None:
    theirs = randomize(_timm_attention(dim, heads, window, **kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmFactorAttention and ours.training == train
    assert ours.crpe is theirs.crpe  # shared, as a CoaT stage shares it
    size = (3, 5)
    x = torch.randn(2, 1 + size[0] * size[1], dim, dtype=D, requires_grad=True)
    torch.manual_seed(1)
    want = theirs(x, size)
    torch.manual_seed(1)
    got = ours(x, size)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(got)
    wanted = torch.autograd.grad(want, [x, *theirs.parameters()], grad)
    for g, w in zip(torch.autograd.grad(got, [x, *ours.parameters()], grad), wanted, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


def test_recorded_rows_are_the_implicit_mixing_matrix() -> None:
    attn = randomize(TimmFactorAttention(8, 2)).eval()  # no position encoding: the mixing is all of it
    x = torch.randn(2, 7, 8, dtype=D)
    with attnzoo.capture_maps(attn, queries=[0, 4]) as maps:
        out = attn(x, (2, 3))
    (record,) = maps[next(iter(maps))]
    v = attn.qkv(x).reshape(2, 7, 3, 2, 4).permute(2, 0, 3, 1, 4)[2]  # (B, h, N, d)
    mixed = (record.data @ v).transpose(1, 2).reshape(2, 2, 8)  # (B, Q, C): the rows applied to the values
    # the module's outputs of those queries, before `proj`: the rows reproduce them
    before_proj = torch.linalg.solve(attn.proj.weight, (out[:, [0, 4]] - attn.proj.bias).transpose(1, 2))
    torch.testing.assert_close(mixed, before_proj.transpose(1, 2), atol=1e-9, rtol=1e-9)


def test_replace_in_a_timm_coat_keeps_logits_checkpoint_and_maps() -> None:
    model = coat.CoaT(img_size=32, patch_size=4, embed_dims=(8, 16, 16, 16), serial_depths=(1, 1, 1, 1),
                      parallel_depth=1, num_heads=2, mlp_ratios=(2, 2, 2, 2), num_classes=3,
                      crpe_window={3: 1, 5: 1}).double()
    checkpoint_keys = set(model.state_dict())
    check_swap(model, [coat.FactorAttnConvRelPosEnc], torch.randn(2, 3, 32, 32, dtype=D), 7, seed=7)
    assert set(model.state_dict()) == checkpoint_keys  # the shared encodings keep their keys


def test_errors_name_what_was_expected() -> None:
    attn = TimmFactorAttention(8, 2)
    with pytest.raises(ValueError, match=r"\(B, 7, 8\)"):
        attn(torch.randn(2, 6, 8), (2, 3))  # the class token and a 2 x 3 map
    with pytest.raises(TypeError, match="size"):
        attn(torch.randn(2, 7, 8), 6)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"size=\(H, W\) for 7 tokens"):
        attn(torch.randn(2, 7, 8))  # 6 map tokens: no square, the size must be given
    square = attn(torch.randn(2, 10, 8))  # a 3 x 3 map by default
    assert square.shape == (2, 10, 8)
    with pytest.raises(TypeError, match="shared_crpe"):
        TimmFactorAttention(8, 2, shared_crpe=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divisible"):
        TimmFactorAttention(10, 3)
