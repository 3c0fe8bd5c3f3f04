"""timm's MobileViT v2 `LinearSelfAttention` as `attnzoo.compat.TimmLinearSelfAttention`: float64 parity
with timm (bias or not, dropout draws), the pooled-keys path equal to the module call a hook forces,
cross-attention where timm's fails, a whole `mobilevitv2_050` swapped by `attnzoo.replace` with its
logits, checkpoint and maps, and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.convert._parity import randomize
from tests.mechanisms._timm_swap import check_swap

import attnzoo
from attnzoo.compat import TimmLinearSelfAttention
from attnzoo.convert import from_timm

mobilevit = pytest.importorskip("timm.models.mobilevit", reason="timm missing")
D = torch.float64


@pytest.mark.parametrize("kwargs", [
    {"embed_dim": 8},
    {"embed_dim": 6, "bias": False},
    {"embed_dim": 8, "attn_drop": 0.3, "proj_drop": 0.2},
])
@pytest.mark.parametrize("train", [False, True])
def test_matches_timm_float64(kwargs: dict, train: bool) -> None:
    theirs = randomize(mobilevit.LinearSelfAttention(**kwargs).double()).train(train)
    ours = from_timm(theirs)
    assert type(ours) is TimmLinearSelfAttention and ours.training == train
    x = torch.randn(2, kwargs["embed_dim"], 4, 9, dtype=D, requires_grad=True)  # (B, C, P, N)
    torch.manual_seed(1)
    want = theirs(x)
    torch.manual_seed(1)  # the same dropout draws on the context scores
    got = ours(x)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    grad = torch.randn_like(got)
    wanted = torch.autograd.grad(want, [x, *theirs.parameters()], grad)
    for g, w in zip(torch.autograd.grad(got, [x, *ours.parameters()], grad), wanted, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)


def test_pooled_keys_equal_the_module_call_a_hook_forces() -> None:
    attn = randomize(TimmLinearSelfAttention(8)).eval()
    x = torch.randn(2, 8, 4, 6, dtype=D)
    pooled = attn(x)
    seen = []
    attn.qkv_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    torch.testing.assert_close(attn(x), pooled, atol=1e-12, rtol=1e-12)
    assert seen == [torch.Size([2, 17, 4, 6])]


def _plain_cross(attn: TimmLinearSelfAttention, x: torch.Tensor, x_prev: torch.Tensor) -> torch.Tensor:
    """The paper's cross-attention written plainly: scores and keys from x_prev, values from x."""
    c = attn.embed_dim
    weight, bias = attn.qkv_proj.weight, attn.qkv_proj.bias
    logit, k = F.conv2d(x_prev, weight[: 1 + c], bias[: 1 + c]).split((1, c), 1)
    v = F.conv2d(x, weight[1 + c:], bias[1 + c:])
    context = (k * logit.softmax(-1)).sum(-1, keepdim=True)
    return attn.out_proj(F.relu(v) * context)


@pytest.mark.parametrize("hooked", [False, True])
def test_cross_attention_runs_where_timms_fails(hooked: bool) -> None:
    theirs = randomize(mobilevit.LinearSelfAttention(8).double()).eval()
    ours = from_timm(theirs)
    if hooked:
        ours.qkv_proj.register_forward_hook(lambda *args: None)
    x, x_prev = torch.randn(2, 8, 4, 6, dtype=D), torch.randn(2, 8, 4, 3, dtype=D)
    with pytest.raises(RuntimeError):
        theirs(x, x_prev)  # timm slices one row of the projection for the values
    torch.testing.assert_close(ours(x, x_prev), _plain_cross(ours, x, x_prev), atol=1e-12, rtol=1e-12)


def test_replace_in_a_timm_mobilevitv2_keeps_logits_checkpoint_and_maps() -> None:
    model = mobilevit.mobilevitv2_050(pretrained=False, num_classes=3).double()
    # 2 + 4 + 3 transformer layers in its three MobileViT v2 blocks
    x = torch.randn(2, 3, 64, 64, dtype=D)
    swapped = check_swap(model, [mobilevit.LinearSelfAttention], x, 9, seed=6)
    with torch.no_grad(), attnzoo.capture_maps(swapped.eval()) as maps:
        swapped(torch.randn(1, 3, 64, 64, dtype=D))
    assert all(m[0].kind == "spatial" for m in maps.values())


def test_errors_name_what_was_expected() -> None:
    attn = TimmLinearSelfAttention(8)
    with pytest.raises(ValueError, match=r"\(B, 8, P, N\)"):
        attn(torch.randn(2, 6, 4, 5))
    with pytest.raises(ValueError, match="x_prev"):
        attn(torch.randn(2, 8, 4, 5), torch.randn(2, 8, 3, 5))  # another number of pixels per patch
    with pytest.raises(ValueError, match="attn_drop"):
        TimmLinearSelfAttention(8, attn_drop=1.5)
