"""fightingcv token mixers (group A) against the real fightingcv classes, float64 within 1e-10."""

from __future__ import annotations

import pytest
import torch

import attnzoo
from attnzoo.convert import from_fightingcv

fcv = pytest.importorskip("fightingcv_attention.attention", reason="fightingcv-attention is not installed")

TOL = {"atol": 1e-10, "rtol": 1e-10}


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """float64 copy with every parameter random (fightingcv's init is std 0.001: too tame to test)."""
    gen = torch.Generator().manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return module


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("dim", "slots", "n"), [(16, 8, 7), (12, 64, 49), (5, 3, 1)])
def test_external_matches_fightingcv(dim, slots, n, train):
    from fightingcv_attention.attention.ExternalAttention import ExternalAttention

    theirs = randomise(ExternalAttention(dim, S=slots), dim + slots).train(train)
    ours = from_fightingcv(theirs)
    assert isinstance(ours, attnzoo.ExternalAttention) and ours.training == train
    x = torch.randn(3, n, dim, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    out, weights = ours(x, need_weights=True)
    assert weights.shape == (3, n, slots)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, n, dtype=torch.float64), **TOL)
    torch.testing.assert_close(out, weights @ ours.mv.weight.T, **TOL)


def test_external_eps_and_errors():
    ea = attnzoo.create("external", 8, memory_size=4)
    assert ea.eps == 1e-9
    with pytest.raises(ValueError, match="x of shape"):
        ea(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="memory_size"):
        attnzoo.ExternalAttention(8, memory_size=0)


def fcv_mask(b: int, h: int, nq: int, nk: int, seed: int) -> torch.Tensor:
    """fightingcv's mask (True = masked), every query keeping at least one key (else fightingcv's NaN)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, h, nq, nk, generator=gen) > 0.6
    mask[..., 0] = False
    return mask


SDPA_CONFIGS = [(16, 4, 4, 4, 7, 7), (12, 5, 3, 2, 6, 9), (8, 8, 8, 1, 1, 3), (10, 3, 7, 3, 5, 5)]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("d_model", "d_k", "d_v", "h", "nq", "nk"), SDPA_CONFIGS)
def test_sdpa_matches_fightingcv(d_model, d_k, d_v, h, nq, nk, masked, train):
    from fightingcv_attention.attention.SelfAttention import ScaledDotProductAttention

    theirs = randomise(ScaledDotProductAttention(d_model, d_k, d_v, h, dropout=0.0), d_model + h).train(train)
    ours = from_fightingcv(theirs)
    assert type(ours) is attnzoo.MultiHeadAttention and (ours.head_dim, ours.value_head_dim) == (d_k, d_v)
    assert ours.training == train
    q = torch.randn(2, nq, d_model, dtype=torch.float64)
    k, v = (torch.randn(2, nk, d_model, dtype=torch.float64) for _ in range(2))
    mask = fcv_mask(2, h, nq, nk, nq + nk) if masked else None
    expected = theirs(q, k, v, attention_mask=mask)
    torch.testing.assert_close(ours(q, k, v, mask=None if mask is None else ~mask), expected, **TOL)
    if nq == nk and not masked:  # self-attention: the fused one-GEMM path
        torch.testing.assert_close(ours(q), theirs(q, q, q), **TOL)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("d_model", "h", "nq", "nk"), [(16, 4, 7, 7), (12, 3, 5, 9), (6, 1, 1, 4)])
def test_simplified_sdpa_matches_fightingcv(d_model, h, nq, nk, masked):
    from fightingcv_attention.attention.SimplifiedSelfAttention import SimplifiedScaledDotProductAttention

    theirs = randomise(SimplifiedScaledDotProductAttention(d_model, h, dropout=0.0), d_model).eval()
    ours = from_fightingcv(theirs)
    assert ours.Wq is None and not ours.in_proj  # no identity projections: only fc_o is learned
    assert set(ours.state_dict()) == {"fc.weight", "fc.bias"}
    q = torch.randn(2, nq, d_model, dtype=torch.float64)
    k, v = (torch.randn(2, nk, d_model, dtype=torch.float64) for _ in range(2))
    mask = fcv_mask(2, h, nq, nk, nq) if masked else None
    expected = theirs(q, k, v, attention_mask=mask)
    torch.testing.assert_close(ours(q, k, v, mask=None if mask is None else ~mask), expected, **TOL)
    bad = SimplifiedScaledDotProductAttention(10, 3)
    with pytest.raises(TypeError, match="not divisible by h=3"):
        from_fightingcv(bad)


def test_mha_head_widths_are_backward_compatible():
    plain = attnzoo.MultiHeadAttention(12, 3)
    assert plain.head_dim == plain.value_head_dim == 4 and plain.Wq.weight.shape == (12, 12)
    wide = attnzoo.MultiHeadAttention(10, 3, head_dim=5, value_head_dim=2)  # 3 does not divide 10
    assert wide.Wq.weight.shape == (15, 10) and wide.Wv.weight.shape == (6, 10)
    assert wide.fc.weight.shape == (10, 6)
    out, weights = wide(torch.randn(2, 4, 10), need_weights=True)
    assert out.shape == (2, 4, 10) and weights.shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="dim=10 must be divisible by num_heads=3"):
        attnzoo.MultiHeadAttention(10, 3)


EMSA_CONFIGS = [
    # d_model, d_k, d_v, h, H, W, ratio, apply_transform
    (16, 4, 4, 4, 8, 8, 2, True),
    (12, 5, 3, 3, 7, 5, 3, True),
    (12, 5, 3, 3, 7, 5, 3, False),
    (8, 6, 6, 1, 5, 6, 2, True),  # one head: no transform
    (10, 4, 2, 2, 4, 3, 1, True),  # no reduction
    (6, 3, 3, 2, 2, 1, 2, True),
]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(
    ("d_model", "d_k", "d_v", "h", "height", "width", "ratio", "transform"), EMSA_CONFIGS
)
def test_emsa_matches_fightingcv(d_model, d_k, d_v, h, height, width, ratio, transform, train):
    from fightingcv_attention.attention.EMSA import EMSA

    theirs = EMSA(d_model, d_k, d_v, h, 0.0, H=height, W=width, ratio=ratio, apply_transform=transform)
    theirs = randomise(theirs, d_model + h + ratio).train(train)
    ours = from_fightingcv(theirs)
    assert isinstance(ours, attnzoo.EMSA) and ours.training == train
    assert ours.apply_transform == (transform and h > 1)
    x = torch.randn(2, height * width, d_model, dtype=torch.float64)
    expected = theirs(x, x, x)
    out, weights = ours(x, need_weights=True, size=(height, width))
    torch.testing.assert_close(out, expected, **TOL)
    assert ours.feat_size == (height, width)
    torch.testing.assert_close(ours(x), expected, **TOL)  # fightingcv's H, W are the default size
    assert weights.shape[:3] == (2, h, height * width)
    if not ours.apply_transform:  # a softmax: rows sum to one
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:3], dtype=torch.float64), **TOL)


def test_emsa_sizes_and_errors():
    attn = attnzoo.create("emsa", 8, num_heads=2, sr_ratio=2)
    x = torch.randn(1, 12, 8)
    with pytest.raises(ValueError, match="size=\\(H, W\\) for x with N=12"):
        attn(x)
    with pytest.raises(ValueError, match="H\\*W = N=12, got \\(3, 5\\)"):
        attn(x, size=(3, 5))
    assert attn(x, size=(4, 3)).shape == (1, 12, 8)
    assert attn(torch.randn(1, 16, 8)).shape == (1, 16, 8)  # square by default
    fixed = attnzoo.EMSA(8, num_heads=2, sr_ratio=2, feat_size=(4, 3))
    fixed.load_state_dict(attn.state_dict())
    torch.testing.assert_close(fixed(x), attn(x, size=(4, 3)))
    with pytest.raises(ValueError, match="EMSA: feat_size must be >= 1, got 0"):
        attnzoo.EMSA(8, feat_size=(4, 0))
    with pytest.raises(ValueError, match=r"feat_size must be an int or a pair of ints, got \(4,\)"):
        attnzoo.EMSA(8, feat_size=(4,))
    assert attnzoo.EMSA(8, feat_size=4).feat_size == (4, 4)
    with pytest.raises(ValueError, match="dim=9 must be divisible by num_heads=2"):
        attnzoo.EMSA(9, num_heads=2)
    assert attnzoo.EMSA(9, num_heads=2, head_dim=4).q.weight.shape == (8, 9)


def test_emsa_single_token_map():
    """fightingcv's InstanceNorm2d raises on a 1 x 1 map; the canonical instance norm gives 0 there."""
    from fightingcv_attention.attention.EMSA import EMSA

    theirs = randomise(EMSA(6, 3, 3, 2, 0.0, H=1, W=1, ratio=2), 0).eval()
    x = torch.randn(2, 1, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        theirs(x, x, x)
    out, weights = from_fightingcv(theirs)(x, need_weights=True)
    torch.testing.assert_close(weights, torch.zeros(2, 2, 1, 1, dtype=torch.float64))
    torch.testing.assert_close(out, theirs.fc_o.bias.expand(2, 1, 6), **TOL)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(
    ("d_model", "d_k", "d_v", "h", "n"), [(16, 4, 4, 4, 7), (12, 5, 3, 3, 9), (8, 6, 2, 1, 1)]
)
def test_muse_matches_fightingcv(d_model, d_k, d_v, h, n, masked, train):
    from fightingcv_attention.attention.MUSEAttention import MUSEAttention

    theirs = randomise(MUSEAttention(d_model, d_k, d_v, h, dropout=0.0), d_model + h).train(train)
    ours = from_fightingcv(theirs)
    assert isinstance(ours, attnzoo.MUSEAttention) and ours.training == train
    q, k, v = (torch.randn(2, n, d_model, dtype=torch.float64) for _ in range(3))
    mask = fcv_mask(2, h, n, n, n) if masked else None
    expected = theirs(q, k, v, attention_mask=mask)  # replaces theirs.dy_paras by its softmax
    torch.testing.assert_close(ours(q, k, v, mask=None if mask is None else ~mask), expected, **TOL)
    # fightingcv's bug: a second identical call differs (softmax of the softmax)
    again = theirs(q, k, v, attention_mask=mask)
    assert not torch.allclose(again, expected)
    torch.testing.assert_close(ours(q, k, v, mask=None if mask is None else ~mask), expected, **TOL)


def test_muse_weights_and_errors():
    muse = attnzoo.create("muse", 8, num_heads=2)
    x = torch.randn(2, 5, 8)
    out, weights = muse(x, need_weights=True)
    torch.testing.assert_close(out, muse(x))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 5))
    assert weights.shape == (2, 2, 5, 5)
    with pytest.raises(ValueError, match="key of shape"):
        muse(x, torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match="kernel_sizes to be odd"):
        attnzoo.MUSEAttention(8, kernel_sizes=(2,))


def aft_reference(module, x, key_mask=None):
    """AFT-full's formula with the explicit (B, T, T, d) tensor, float64."""
    length = x.shape[1]
    q, k, v = module.q(x), module.k(x), module.v(x)
    w = torch.zeros(length, length, dtype=x.dtype)
    if not module.simple:
        w = module.position_bias[:length, :length]
    logits = k[:, None] + w[None, :, :, None]  # (B, T, T', d)
    if module.causal:
        future = ~torch.ones(length, length, dtype=torch.bool).tril()
        logits = logits.masked_fill(future[None, :, :, None], -torch.inf)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, :, None], -torch.inf)
    weights = logits.softmax(dim=2)
    return q.sigmoid() * (weights * v[:, None]).sum(2), weights


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(
    ("dim", "n", "simple"), [(16, 7, False), (12, 49, False), (5, 1, False), (8, 9, True)]
)
def test_aft_full_matches_fightingcv(dim, n, simple, train):
    from fightingcv_attention.attention.AFT import AFT_FULL

    theirs = randomise(AFT_FULL(dim, n=n, simple=simple), dim + n).train(train)
    ours = from_fightingcv(theirs)
    assert isinstance(ours, attnzoo.AFTFull) and ours.simple == simple and ours.training == train
    x = torch.randn(3, n, dim, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    out, weights = ours(x, need_weights=True)
    ref, ref_weights = aft_reference(ours, x)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(weights, ref_weights, **TOL)


@pytest.mark.parametrize("simple", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_aft_full_masks_shorter_inputs_and_stability(simple, causal):
    torch.manual_seed(0)
    aft = attnzoo.AFTFull(6, max_len=12, simple=simple, causal=causal, dtype=torch.float64)
    if not simple:
        torch.nn.init.normal_(aft.position_bias, std=2.0)
    x = torch.randn(2, 9, 6, dtype=torch.float64)  # fewer tokens than max_len
    key_mask = torch.rand(2, 9) > 0.4
    key_mask[:, 0] = True
    for mask in (None, key_mask):
        out, weights = aft(x, need_weights=True, key_mask=mask)
        ref, ref_weights = aft_reference(aft, x, mask)
        torch.testing.assert_close(out, ref, **TOL)
        torch.testing.assert_close(weights, ref_weights, **TOL)
    big = x * 1e3  # exp overflows unstabilised; the factorised form stays finite
    assert torch.isfinite(aft(big)).all()
    dead = torch.zeros(2, 9, dtype=torch.bool)
    torch.testing.assert_close(aft(x, key_mask=dead), torch.zeros(2, 9, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_len=12"):
        attnzoo.AFTFull(6, max_len=12)(torch.randn(1, 13, 6))


def test_aft_full_gradients_with_padding():
    torch.manual_seed(1)
    aft = attnzoo.AFTFull(3, max_len=5, causal=True, dtype=torch.float64)
    torch.nn.init.normal_(aft.position_bias)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    key_mask = torch.tensor([[True, False, True, True, False], [False, False, False, False, False]])
    assert torch.autograd.gradcheck(lambda t: aft(t, key_mask=key_mask), (x,))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize(("d_model", "d_k", "d_v", "h", "nq", "nk"), SDPA_CONFIGS)
def test_ufo_matches_fightingcv(d_model, d_k, d_v, h, nq, nk, train):
    from fightingcv_attention.attention.UFOAttention import UFOAttention

    theirs = randomise(UFOAttention(d_model, d_k, d_v, h, dropout=0.5), d_model + h).train(train)
    ours = from_fightingcv(theirs)
    assert isinstance(ours, attnzoo.UFOAttention) and ours.eps == 0.0 and ours.training == train
    q = torch.randn(2, nq, d_model, dtype=torch.float64)
    k, v = (torch.randn(2, nk, d_model, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(ours(q, k, v), theirs(q, k, v), **TOL)  # fightingcv's dropout is unused
    if nq == nk:
        torch.testing.assert_close(ours(q), theirs(q, q, q), **TOL)
    _, kv = ours(q, k, v, need_weights=True)
    norms = torch.linalg.vector_norm(kv, dim=-1)  # (B, h, d): each row has norm |gamma_h|
    torch.testing.assert_close(norms, ours.gamma.abs().reshape(1, h, 1).expand_as(norms), **TOL)


def test_ufo_key_mask_drops_padding_and_eps():
    torch.manual_seed(0)
    ufo = attnzoo.UFOAttention(8, num_heads=2, dtype=torch.float64)
    q = torch.randn(2, 4, 8, dtype=torch.float64)
    kv = torch.randn(2, 6, 8, dtype=torch.float64)
    key_mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    out = ufo(q, kv, key_mask=key_mask)
    torch.testing.assert_close(out[0], ufo(q[:1], kv[:1])[0], **TOL)
    torch.testing.assert_close(out[1], ufo(q[1:], kv[1:, :3])[0], **TOL)
    with torch.no_grad():  # an all-zero query stays finite thanks to eps
        ufo.q.weight.zero_()
        ufo.q.bias.zero_()
    assert torch.isfinite(ufo(q)).all()


def _fcv(name: str):
    import importlib

    module, cls = name.rsplit(".", 1)
    return getattr(importlib.import_module(f"fightingcv_attention.attention.{module}"), cls)


GRAD_CASES = [  # fightingcv class, its arguments, distinct inputs (self-attention classes get x, x, x)
    ("ExternalAttention.ExternalAttention", (12,), {"S": 5}, 1),
    ("SelfAttention.ScaledDotProductAttention", (12, 5, 3, 3), {"dropout": 0.0}, 3),
    ("SimplifiedSelfAttention.SimplifiedScaledDotProductAttention", (12, 3), {"dropout": 0.0}, 3),
    ("EMSA.EMSA", (12, 5, 3, 3), {"dropout": 0.0, "H": 4, "W": 3, "ratio": 2}, 1),
    ("MUSEAttention.MUSEAttention", (12, 5, 3, 3), {"dropout": 0.0}, 3),
    ("AFT.AFT_FULL", (12,), {"n": 12}, 1),
    ("UFOAttention.UFOAttention", (12, 5, 3, 3), {}, 3),
]


@pytest.mark.parametrize(("name", "args", "kwargs", "inputs"), GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_input_gradients_match_fightingcv(name, args, kwargs, inputs):
    theirs = randomise(_fcv(name)(*args, **kwargs), 7).train()
    ours = from_fightingcv(theirs)  # before fightingcv's MUSE call replaces its dy_paras
    xs = [torch.randn(2, 12, 12, dtype=torch.float64, requires_grad=True) for _ in range(inputs)]
    call = xs * 3 if name.startswith("EMSA") else xs  # fightingcv's EMSA takes (x, x, x)
    g_theirs = torch.autograd.grad(theirs(*call).pow(2).sum(), xs)
    g_ours = torch.autograd.grad(ours(*xs).pow(2).sum(), xs)
    for a, b in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, b, **TOL)
