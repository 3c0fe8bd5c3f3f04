"""Lambda layer (LambdaNetworks): parity with timm's LambdaLayer in float64, formula, errors."""

from __future__ import annotations

import pytest
import torch
from _token_mixing import D, check_parity, randomised

import attnzoo
from attnzoo import LambdaLayer
from attnzoo.convert import convert, from_timm

timm_layers = pytest.importorskip("timm.layers", reason="timm is needed for the parity tests")
from timm.layers.lambda_layer import LambdaLayer as TimmLambdaLayer  # noqa: E402

CASES = [
    # (timm module, input shape)
    (lambda: timm_layers.create_attn("lambda", 32), (2, 32, 7, 9)),
    (lambda: TimmLambdaLayer(12, num_heads=3, dim_head=5, r=3, qkv_bias=True), (2, 12, 5, 4)),
    (lambda: TimmLambdaLayer(15, num_heads=5, dim_head=None, r=5, stride=2), (2, 15, 7, 6)),
    (lambda: TimmLambdaLayer(9, num_heads=3, dim_head=4, r=None, feat_size=(4, 5)), (2, 9, 4, 5)),
    (lambda: TimmLambdaLayer(16, num_heads=2, dim_head=None, qk_ratio=0.5, r=None, feat_size=4, stride=2),
     (3, 16, 4, 4)),
]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_from_timm_matches_timm_in_float64(case, training):
    build, shape = CASES[case]
    theirs = randomised(build())
    ours = from_timm(theirs)
    assert type(ours) is LambdaLayer
    check_parity(theirs, ours, shape, training)


def test_create_loads_timms_state_dict():
    theirs = randomised(timm_layers.create_attn("lambda", 16)).eval()
    ours = attnzoo.create("lambda", 16, dtype=D).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # timm's 5-D conv_lambda weight loads
    x = torch.randn(2, 16, 6, 5, dtype=D)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=0)
    assert type(convert(theirs)) is LambdaLayer


def test_out_channels_differ_from_channels():
    """timm reshapes to the input's C and fails for dim_out != dim; here the output has out_channels,
    and equals timm's computation head by head (checked through a dim_out == dim twin)."""
    m = randomised(LambdaLayer(8, out_channels=12, num_heads=3, head_dim=4, r=3)).eval()
    assert m(torch.randn(2, 8, 5, 5, dtype=D)).shape == (2, 12, 5, 5)
    with pytest.raises(RuntimeError):
        TimmLambdaLayer(8, dim_out=12, num_heads=3, dim_head=4, r=3).eval()(torch.randn(2, 8, 5, 5))


def _lambdas(m: LambdaLayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries (h, k, H, W), normalised keys (k, H, W), values (v, H, W) of one sample (eval mode)."""
    heads, k, v = m.num_heads, m.head_dim, m.v_head_dim
    q, keys, values = m.qkv(x).split([heads * k, k, v], dim=1)
    height, width = x.shape[-2:]
    keys = keys[0].reshape(k, -1).softmax(-1).view(k, height, width)
    return m.norm_q(q)[0].view(heads, k, height, width), keys, m.norm_v(values)[0]


def test_formula_lambda_convolution():
    """y_n = (lambda^c + lambda^p_n)^T q_n with lambda^p_n[k] = sum_off w_k[off] v_{n + off} + b_k."""
    m = randomised(LambdaLayer(4, num_heads=2, head_dim=3, r=3)).eval()
    x = torch.randn(1, 4, 3, 4, dtype=D)
    q, keys, values = _lambdas(m, x)  # (2, 3, 3, 4), (3, 3, 4), (2, 3, 4)
    content = torch.einsum("kyx,vyx->kv", keys, values)
    w, bias = m.conv_lambda.weight[:, 0], m.conv_lambda.bias  # (k, 3, 3), (k,)
    expected = torch.zeros(2, 2, 3, 4, dtype=D)  # (h, v, H, W)
    for y in range(3):
        for xx in range(4):
            lam = content + bias[:, None]
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if 0 <= y + dy < 3 and 0 <= xx + dx < 4:
                        lam = lam + w[:, dy + 1, dx + 1, None] * values[None, :, y + dy, xx + dx]
            expected[:, :, y, xx] = q[:, :, y, xx] @ lam
    out, weights = m(x, need_weights=True)
    torch.testing.assert_close(out, expected.reshape(1, 4, 3, 4), atol=1e-12, rtol=0)
    torch.testing.assert_close(weights[0], keys, atol=1e-12, rtol=0)


def test_formula_global_embedding():
    """lambda^p_n = sum_m E[offset(n -> m)]^T v_m over a fixed map."""
    m = randomised(LambdaLayer(4, num_heads=2, head_dim=3, r=None, feat_size=(2, 3))).eval()
    x = torch.randn(1, 4, 2, 3, dtype=D)
    q, keys, values = _lambdas(m, x)
    content = torch.einsum("kyx,vyx->kv", keys, values)
    expected = torch.zeros(2, 2, 2, 3, dtype=D)
    for y in range(2):
        for xx in range(3):
            lam = content.clone()
            for ym in range(2):
                for xm in range(3):
                    lam = lam + m.pos_emb[ym - y + 1, xm - xx + 2][:, None] * values[None, :, ym, xm]
            expected[:, :, y, xx] = q[:, :, y, xx] @ lam
    torch.testing.assert_close(m(x), expected.reshape(1, 4, 2, 3), atol=1e-12, rtol=0)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_heads"):
        LambdaLayer(10, num_heads=4)
    with pytest.raises(ValueError, match="r must be odd"):
        LambdaLayer(8, r=4)
    with pytest.raises(ValueError, match="feat_size"):
        LambdaLayer(8, r=None)
    with pytest.raises(ValueError, match="feat_size"):
        LambdaLayer(8, r=3, feat_size=4)
    with pytest.raises(ValueError, match="stride"):
        LambdaLayer(8, stride=3)
    with pytest.raises(ValueError, match="W=5"):
        LambdaLayer(8, r=None, feat_size=(4, 5))(torch.randn(1, 8, 4, 4))


def test_captured_map_is_the_mean_normalised_key():
    m = randomised(LambdaLayer(8, num_heads=2, head_dim=4, r=3)).eval()
    x = torch.randn(2, 8, 5, 6, dtype=D)
    with attnzoo.capture_maps(m) as maps:
        _, keys = m(x, need_weights=True)
    (entry,) = [r for records in maps.values() for r in records]
    assert entry.kind == "spatial"
    torch.testing.assert_close(entry.data, keys.mean(1), atol=1e-12, rtol=0)
    torch.testing.assert_close(keys.sum((2, 3)), torch.ones(2, 4, dtype=D))


@pytest.mark.parametrize("kwargs", [{"r": 3}, {"r": None, "feat_size": (4, 5)}], ids=["conv", "global"])
def test_batch_of_one_gradients_are_right(kwargs):
    """torch's CPU BatchNorm backward gives a wrong input gradient for a batch of one when the gradient
    reaching it is channels-last strided with another batch stride than C*H*W, which the lambdas' einsum
    and convolution backward give (timm's LambdaLayer is wrong there): a sample alone gets the gradient
    it gets in a batch of two (eval), and gradcheck holds in training too."""
    m = randomised(LambdaLayer(8, num_heads=2, head_dim=4, **kwargs)).eval()
    x = torch.randn(2, 8, 4, 5, dtype=D, requires_grad=True)
    g = torch.randn(2, 8, 4, 5, dtype=D)
    (both,) = torch.autograd.grad(m(x), x, g)
    (alone,) = torch.autograd.grad(m(x[:1]), x, g[:1])
    torch.testing.assert_close(alone[:1], both[:1], atol=1e-10, rtol=1e-10)
    one = x[:1].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(m.train(), (one,))
    assert torch.autograd.gradgradcheck(m, (one,))
