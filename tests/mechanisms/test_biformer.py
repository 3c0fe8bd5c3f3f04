"""BiFormer BRA: golden official outputs, a plain float64 reference (values and gradients), errors."""

from __future__ import annotations

import inspect
import math
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import golden_files

import attnzoo
from attnzoo import BiLevelRoutingAttention, BiLevelRoutingAttention2d
from attnzoo.compat import BiLevelRoutingAttention as CompatBRA
from attnzoo.compat import nchwBRA

GOLDEN_TOL = {torch.float64: 1e-8, torch.float32: 1e-4}


# ---------------------------------------------------------------------------------------------
# Plain references, written from the official algorithms (loops over windows, no fast paths).


def _pool(grid: torch.Tensor, m) -> torch.Tensor:
    """The official per-window kv down-sampling of a (C, h, w) grid."""
    mode, ratio, per = m.kv_downsample_mode, m.kv_downsample_ratio, m.kv_per_win
    if mode == "ada_avgpool":
        return F.adaptive_avg_pool2d(grid, per)
    if mode == "ada_maxpool":
        return F.adaptive_max_pool2d(grid, per)
    if mode == "avgpool" and ratio > 1:
        return F.avg_pool2d(grid, ratio)
    if mode == "maxpool" and ratio > 1:
        return F.max_pool2d(grid, ratio)
    return grid


def legacy_reference(m, x: torch.Tensor):
    """bra_legacy.py step by step on an NHWC map; returns (out, r_weight, r_idx, attn)."""
    p = dict(m.named_parameters())
    n_win, c, dim, heads = m.n_win, m.qk_dim, m.dim, m.num_heads
    n, h_in, w_in, _ = x.shape
    if m.auto_pad:
        x = F.pad(x, (0, 0, 0, (-w_in) % n_win, 0, (-h_in) % n_win))  # before the projection
    _, hh, ww, _ = x.shape
    wh, wwid = hh // n_win, ww // n_win
    qkv = x @ p["qkv.qkv.weight"].T + p["qkv.qkv.bias"]
    q, k, v = qkv.split([c, c, dim], dim=-1)
    wins = [(j, i) for j in range(n_win) for i in range(n_win)]

    def window(t, b, j, i):
        return t[b, j * wh : (j + 1) * wh, i * wwid : (i + 1) * wwid]  # (wh, ww, C)

    q_r = torch.stack([torch.stack([window(q, b, j, i).mean((0, 1)) for j, i in wins]) for b in range(n)])
    k_r = torch.stack([torch.stack([window(k, b, j, i).mean((0, 1)) for j, i in wins]) for b in range(n)])
    if not m.diff_routing:
        q_r, k_r = q_r.detach(), k_r.detach()
    if m.param_routing:
        emb_w, emb_b = p["router.emb.weight"], p["router.emb.bias"]
        q_r, k_r = q_r @ emb_w.T + emb_b, k_r @ emb_w.T + emb_b
    logits = (q_r * m.scale) @ k_r.transpose(-1, -2)
    top, r_idx = torch.topk(logits, m.topk, dim=-1)
    r_weight = top.softmax(-1)
    out = torch.zeros(n, hh, ww, dim, dtype=x.dtype)
    attn_all = []
    for b in range(n):
        kv_tokens = []
        for j, i in wins:
            kv = torch.cat([window(k, b, j, i), window(v, b, j, i)], -1).permute(2, 0, 1)  # (c+dim, wh, ww)
            kv_tokens.append(_pool(kv, m).flatten(1).T)  # (S, c+dim)
        for r, (j, i) in enumerate(wins):
            sel = [
                kv_tokens[int(t)] * (r_weight[b, r, s] if m.soft_routing else 1.0)
                for s, t in enumerate(r_idx[b, r])
            ]
            sel = torch.cat(sel)  # (topk*S, c+dim)
            qw = window(q, b, j, i).reshape(-1, c)
            outs, attns = [], []
            for hd in range(heads):
                qs, ks = (
                    qw[:, hd * c // heads : (hd + 1) * c // heads],
                    sel[:, hd * c // heads : (hd + 1) * c // heads],
                )
                vs = sel[:, c + hd * dim // heads : c + (hd + 1) * dim // heads]
                a = ((qs * m.scale) @ ks.T).softmax(-1)
                outs.append(a @ vs)
                attns.append(a)
            out[b, j * wh : (j + 1) * wh, i * wwid : (i + 1) * wwid] = torch.cat(outs, -1).view(wh, wwid, dim)
            attn_all.append(torch.stack(attns))
    if m.side_dwconv > 0:
        lepe = F.conv2d(
            v.permute(0, 3, 1, 2), p["lepe.weight"], p["lepe.bias"], padding=m.side_dwconv // 2, groups=dim
        )
        out = out + lepe.permute(0, 2, 3, 1)
    if m.param_attention == "qkvo":
        out = out @ p["wo.weight"].T + p["wo.bias"]
    return out[:, :h_in, :w_in], r_weight, r_idx, torch.stack(attn_all)


def nchw_reference(m, x: torch.Tensor):
    """bra_nchw.py + rrsda.py step by step; returns (out, attn)."""
    p = dict(m.named_parameters())
    n, dim, h, w = x.shape
    heads, d = m.num_heads, dim // m.num_heads
    rh, rw = h // m.n_win, w // m.n_win
    q, k, v = F.conv2d(x, p["qkv_linear.weight"], p["qkv_linear.bias"]).chunk(3, dim=1)
    q_r = (
        F.avg_pool2d(q.detach(), (rh, rw), ceil_mode=True, count_include_pad=False).flatten(2).transpose(1, 2)
    )
    k_r = F.avg_pool2d(k.detach(), (rh, rw), ceil_mode=True, count_include_pad=False).flatten(2)
    r_idx = torch.topk(q_r @ k_r, m.topk, dim=-1).indices
    n_h, n_w = math.ceil(h / rh), math.ceil(w / rw)
    pad = (0, n_w * rw - w, 0, n_h * rh - h)
    qp, kp, vp = (F.pad(t, pad) for t in (q, k, v))  # zeros after the projection, never masked

    def region(t, b, r):
        j, i = divmod(r, n_w)
        return t[b, :, j * rh : (j + 1) * rh, i * rw : (i + 1) * rw].flatten(1).T  # (rh*rw, C)

    out = torch.zeros(n, dim, n_h * rh, n_w * rw, dtype=x.dtype)
    attn = torch.zeros(n, heads, n_h * n_w, rh * rw, m.topk * rh * rw, dtype=x.dtype)
    for b in range(n):
        for r in range(n_h * n_w):
            keys = torch.cat([region(kp, b, int(t)) for t in r_idx[b, r]])
            vals = torch.cat([region(vp, b, int(t)) for t in r_idx[b, r]])
            qr = region(qp, b, r)
            heads_out = []
            for hd in range(heads):
                sl = slice(hd * d, (hd + 1) * d)
                a = ((qr[:, sl] * m.scale) @ keys[:, sl].T).softmax(-1)
                attn[b, hd, r] = a.detach()
                heads_out.append(a @ vals[:, sl])
            j, i = divmod(r, n_w)
            out[b, :, j * rh : (j + 1) * rh, i * rw : (i + 1) * rw] = torch.cat(heads_out, -1).T.reshape(
                dim, rh, rw
            )
    out = out[:, :, :h, :w]
    if m.lepe is not None:
        out = out + F.conv2d(v, p["lepe.weight"], p["lepe.bias"], padding=m.lepe.padding, groups=dim)
    return F.conv2d(out, p["output_linear.weight"], p["output_linear.bias"]), attn


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in module.parameters():
            prm.copy_(
                torch.randn(prm.shape, generator=gen, dtype=prm.dtype) / math.sqrt(max(prm[0].numel(), 1))
            )


def assert_same_grads(module, x, out_fast, out_ref) -> None:
    """Gradients of a random projection of both outputs, wrt the input and every parameter."""
    weight = torch.randn(out_fast.shape, generator=torch.Generator().manual_seed(5), dtype=out_fast.dtype)
    names = [n for n, _ in module.named_parameters()]
    inputs = [x, *module.parameters()]
    g_fast = torch.autograd.grad((out_fast * weight).sum(), inputs, allow_unused=True)
    g_ref = torch.autograd.grad((out_ref * weight).sum(), inputs, allow_unused=True)
    for name, a, b in zip(["x", *names], g_fast, g_ref, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(
                a, b, atol=1e-10, rtol=1e-9, msg=lambda m, name=name: f"grad {name}: {m}"
            )


# ---------------------------------------------------------------------------------------------
# Golden files recorded from the official code.


def _call_golden(factory, rec):
    m = factory(**rec["kwargs"]).to(getattr(torch, rec["dtype"]))
    m.load_state_dict(rec["state_dict"], strict=True)
    m.eval()
    with torch.no_grad():
        return m(
            *[rec["inputs"][a] for a in rec["forward_args"]],
            **{k: rec["inputs"][k] for k in rec["forward_tensor_kwargs"]},
            **rec["forward_kwargs"],
        )


@pytest.mark.parametrize(
    "path", golden_files("bra_legacy_*.pt") + golden_files("bra_nchw_*.pt"), ids=lambda p: p.name
)
def test_golden_official_outputs(path):
    rec = torch.load(path, weights_only=True)
    factory = nchwBRA if rec["target"] == "bra_nchw" else CompatBRA
    prev = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, rec["default_dtype"]))
    try:
        out = _call_golden(factory, rec)
    finally:
        torch.set_default_dtype(prev)
    expected = rec["output"] if isinstance(rec["output"], tuple) else (rec["output"],)
    got = out if isinstance(out, tuple) else (out,)
    assert len(got) == len(expected)
    tol = GOLDEN_TOL[getattr(torch, rec["dtype"])]
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.dtype == torch.int64:
            assert torch.equal(a, b)
        else:
            assert (a - b).abs().max().item() <= tol


@pytest.mark.parametrize("path", golden_files("bra_legacy_*.pt"), ids=lambda p: p.name)
def test_golden_canonical_class_both_layouts(path):
    rec = torch.load(path, weights_only=True)
    expected = rec["output"][0] if isinstance(rec["output"], tuple) else rec["output"]
    x = rec["inputs"]["x"]
    for layout, inp in (("nhwc", x), ("nchw", x.permute(0, 3, 1, 2).contiguous())):
        m = BiLevelRoutingAttention(**rec["kwargs"], layout=layout).double()
        m.load_state_dict(rec["state_dict"], strict=True)
        with torch.no_grad():
            out = m.eval()(inp)
        out = out.permute(0, 2, 3, 1) if layout == "nchw" else out
        assert (out - expected).abs().max().item() <= 1e-8


@pytest.mark.parametrize("path", golden_files("bra_nchw_*.pt"), ids=lambda p: p.name)
def test_golden_canonical_nchw_class(path):
    """BiLevelRoutingAttention2d(channels=official dim) loads the official state_dict; official numbers."""
    rec = torch.load(path, weights_only=True)
    kwargs = dict(rec["kwargs"])
    m = BiLevelRoutingAttention2d(kwargs.pop("dim"), **kwargs, dtype=torch.float64)
    m.load_state_dict(rec["state_dict"], strict=True)
    need = bool(rec["forward_kwargs"].get("ret_attn_mask"))
    with torch.no_grad():
        out = m.eval()(rec["inputs"]["x"], need_weights=need)
    got = out if isinstance(out, tuple) else (out,)
    expected = rec["output"] if isinstance(rec["output"], tuple) else (rec["output"],)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-8


def _plain_signature(fn) -> str:
    """`(self, dim, num_heads=8, ...)`: names and defaults, no annotations (as the golden files record it)."""
    params = inspect.signature(fn).parameters.values()
    names = [p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params]
    return "(" + ", ".join(names) + ")"


@pytest.mark.parametrize("target,cls", [("bra_legacy_01.pt", CompatBRA), ("bra_nchw_01.pt", nchwBRA)])
def test_compat_signatures_are_official(target, cls):
    paths = golden_files(target)
    if not paths:
        pytest.skip(f"no golden file {target}")
    rec = torch.load(paths[0], weights_only=True)
    assert _plain_signature(cls.__init__) == rec["init_signature"]
    assert _plain_signature(cls.forward) == re.sub(r": [\w.]+", "", rec["forward_signature"])


# ---------------------------------------------------------------------------------------------
# More configurations against the plain float64 reference, values and gradients.

LEGACY_CASES = [
    ({"dim": 8, "num_heads": 2, "n_win": 2, "topk": 2}, (2, 4, 4)),
    (
        {
            "dim": 8,
            "num_heads": 2,
            "n_win": 2,
            "topk": 1,
            "qk_dim": 4,
            "qk_scale": 0.3,
            "param_attention": "qkv",
        },
        (1, 4, 6),
    ),
    (
        {
            "dim": 8,
            "num_heads": 4,
            "n_win": 2,
            "topk": 3,
            "kv_downsample_mode": "ada_avgpool",
            "kv_per_win": 2,
        },
        (1, 6, 6),
    ),
    (
        {
            "dim": 8,
            "num_heads": 2,
            "n_win": 2,
            "topk": 2,
            "kv_downsample_mode": "ada_maxpool",
            "kv_per_win": 3,
        },
        (1, 4, 4),
    ),
    (
        {
            "dim": 8,
            "num_heads": 2,
            "n_win": 2,
            "topk": 2,
            "kv_downsample_mode": "avgpool",
            "kv_downsample_ratio": 2,
        },
        (1, 6, 4),
    ),
    (
        {
            "dim": 8,
            "num_heads": 2,
            "n_win": 2,
            "topk": 2,
            "kv_downsample_mode": "maxpool",
            "kv_downsample_ratio": 2,
        },
        (1, 4, 4),
    ),
    (
        {
            "dim": 8,
            "num_heads": 2,
            "n_win": 2,
            "topk": 2,
            "kv_downsample_mode": "avgpool",
            "kv_downsample_ratio": 1,
        },
        (1, 4, 4),
    ),
    ({"dim": 8, "num_heads": 2, "n_win": 3, "topk": 4, "soft_routing": True}, (1, 6, 6)),
    (
        {"dim": 8, "num_heads": 2, "n_win": 2, "topk": 3, "soft_routing": True, "diff_routing": True},
        (1, 4, 4),
    ),
    (
        {
            "dim": 8,
            "num_heads": 2,
            "n_win": 2,
            "topk": 2,
            "param_routing": True,
            "diff_routing": True,
            "soft_routing": True,
            "side_dwconv": 0,
        },
        (2, 4, 4),
    ),
    ({"dim": 8, "num_heads": 2, "n_win": 2, "topk": 2, "side_dwconv": 5, "auto_pad": True}, (1, 5, 7)),
    ({"dim": 8, "num_heads": 2, "n_win": 3, "topk": 2, "auto_pad": True}, (1, 2, 4)),
    ({"dim": 4, "num_heads": 1, "n_win": 9, "topk": 5}, (1, 9, 9)),  # 81 regions, one head
]


@pytest.mark.parametrize("kwargs,size", LEGACY_CASES, ids=[str(i) for i in range(len(LEGACY_CASES))])
def test_legacy_matches_reference_values_and_gradients(kwargs, size):
    m = CompatBRA(**kwargs).double()
    randomize(m)
    n, h, w = size
    x = torch.randn(n, h, w, kwargs["dim"], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x.requires_grad_()
    out, r_weight, r_idx, attn = m(x, ret_attn_mask=True)
    ref, ref_weight, ref_idx, ref_attn = legacy_reference(m, x)
    assert torch.equal(r_idx, ref_idx)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(r_weight, ref_weight, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(attn, ref_attn, atol=1e-12, rtol=1e-10)
    assert_same_grads(m, x, m(x), ref)
    canonical = BiLevelRoutingAttention(**kwargs, dtype=torch.float64)
    canonical.load_state_dict(m.state_dict(), strict=True)
    out2, attn2 = canonical(x, need_weights=True)
    torch.testing.assert_close(out2, ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(attn2, ref_attn, atol=1e-12, rtol=1e-10)


NCHW_CASES = [
    ({"dim": 8, "num_heads": 2, "n_win": 2, "topk": 2}, (2, 4, 4)),
    ({"dim": 8, "num_heads": 2, "n_win": 4, "topk": 20, "side_dwconv": 5}, (1, 13, 15)),  # 5x5 = 25 regions
    ({"dim": 8, "num_heads": 4, "n_win": 2, "topk": 3, "qk_scale": 0.7, "side_dwconv": 0}, (1, 5, 4)),
    ({"dim": 4, "num_heads": 1, "n_win": 3, "topk": 2}, (2, 3, 8)),
]


@pytest.mark.parametrize("kwargs,size", NCHW_CASES, ids=[str(i) for i in range(len(NCHW_CASES))])
def test_nchw_matches_reference_values_and_gradients(kwargs, size):
    m = nchwBRA(**kwargs).double()
    randomize(m)
    n, h, w = size
    x = torch.randn(n, kwargs["dim"], h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x.requires_grad_()
    out, attn = m(x, ret_attn_mask=True)
    ref, ref_attn = nchw_reference(m, x)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(attn, ref_attn, atol=1e-12, rtol=1e-10)
    assert out.is_contiguous()
    assert_same_grads(m, x, m(x), ref)
    cl = m(x.detach().contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, ref, atol=1e-10, rtol=1e-9)
    canonical = BiLevelRoutingAttention2d(
        kwargs["dim"], **{k: v for k, v in kwargs.items() if k != "dim"}, dtype=torch.float64
    )
    canonical.load_state_dict(m.state_dict(), strict=True)
    out2, attn2 = canonical(x, need_weights=True)
    torch.testing.assert_close(out2, ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(attn2, ref_attn, atol=1e-12, rtol=1e-10)


def test_all_regions_equal_full_attention_plus_lepe():
    """topk = n_win**2: every window sees every token, so BRA is plain multi-head attention + lepe."""
    m = BiLevelRoutingAttention(8, num_heads=2, n_win=2, topk=4).double().eval()
    randomize(m)
    x = torch.randn(2, 4, 6, 8, dtype=torch.float64)
    p = dict(m.named_parameters())
    q, k, v = (x @ p["qkv.qkv.weight"].T + p["qkv.qkv.bias"]).flatten(1, 2).split(8, -1)
    heads = [t.unflatten(-1, (2, 4)).transpose(1, 2) for t in (q, k, v)]
    full = F.scaled_dot_product_attention(*heads, scale=8**-0.5).transpose(1, 2).reshape(2, 4, 6, 8)
    lepe = F.conv2d(
        v.view(2, 4, 6, 8).permute(0, 3, 1, 2), p["lepe.weight"], p["lepe.bias"], padding=1, groups=8
    )
    expected = (full + lepe.permute(0, 2, 3, 1)) @ p["wo.weight"].T + p["wo.bias"]
    torch.testing.assert_close(m(x), expected, atol=1e-12, rtol=1e-10)


def test_fused_and_math_paths_agree_with_routing():
    m = BiLevelRoutingAttention(8, num_heads=2, n_win=3, topk=2, soft_routing=True).double().eval()
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    with attnzoo.fused_attn(False):
        plain = m(x)
    torch.testing.assert_close(m(x), plain, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Interface: layouts, state_dict keys, pickling, registry, errors.


def test_state_dict_keys_are_official():
    assert list(CompatBRA(32, 4, 7).state_dict()) == [
        "lepe.weight",
        "lepe.bias",
        "qkv.qkv.weight",
        "qkv.qkv.bias",
        "wo.weight",
        "wo.bias",
    ]
    keys = list(
        CompatBRA(
            32,
            2,
            4,
            topk=4,
            param_routing=True,
            diff_routing=True,
            soft_routing=True,
            side_dwconv=0,
            param_attention="qkv",
        ).state_dict()
    )
    assert keys == ["router.emb.weight", "router.emb.bias", "qkv.qkv.weight", "qkv.qkv.bias"]
    assert list(nchwBRA(32, 4).state_dict()) == [
        "lepe.weight",
        "lepe.bias",
        "qkv_linear.weight",
        "qkv_linear.bias",
        "output_linear.weight",
        "output_linear.bias",
    ]
    assert CompatBRA(32, 4, 7, qk_dim=16).state_dict()["qkv.qkv.weight"].shape == (64, 32)


def test_positional_order_and_pickle_without_lepe():
    m = CompatBRA(16, 2, 4, side_dwconv=0)
    assert (m.dim, m.num_heads, m.n_win) == (16, 2, 4)
    x = torch.randn(1, 8, 8, 16)
    clone = pickle.loads(pickle.dumps(m))
    torch.testing.assert_close(clone(x), m(x))
    assert pickle.loads(pickle.dumps(nchwBRA(8, 2, 2, side_dwconv=0))).lepe is None


def test_compat_returns_official_tuple_and_create_by_seed_name():
    m = attnzoo.create("BiLevelRoutingAttention", dim=8, num_heads=2, n_win=2, topk=3)
    assert type(m) is CompatBRA
    out, r_weight, r_idx, attn = m(torch.randn(2, 4, 6, 8), ret_attn_mask=True)
    assert out.shape == (2, 4, 6, 8) and r_weight.shape == r_idx.shape == (2, 4, 3)
    assert r_idx.dtype == torch.int64 and attn.shape == (8, 2, 6, 18)
    torch.testing.assert_close(r_weight.sum(-1), torch.ones(2, 4))
    assert type(attnzoo.create("bra", dim=8)) is BiLevelRoutingAttention
    assert type(attnzoo.create("bra_nchw", 8)) is BiLevelRoutingAttention2d
    assert type(attnzoo.create("bra_nchw", channels=8)) is BiLevelRoutingAttention2d
    assert type(attnzoo.create("nchwBRA", dim=8, auto_pad=True)) is nchwBRA
    assert attnzoo.nchwBRA is nchwBRA and isinstance(nchwBRA(8, 2, 2), BiLevelRoutingAttention2d)


def test_need_weights_only_on_canonical_classes():
    x = torch.randn(2, 4, 6, 8)
    m = BiLevelRoutingAttention(8, num_heads=2, n_win=2, topk=3).eval()
    out, weights = m(x, need_weights=True)
    torch.testing.assert_close(out, m(x))
    assert weights.shape == (8, 2, 6, 18)  # (N*R, heads, w^2, topk*w^2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(8, 2, 6))
    nchw = BiLevelRoutingAttention2d(8, num_heads=2, n_win=2, topk=3).eval()
    out, weights = nchw(x.permute(0, 3, 1, 2), need_weights=True)
    assert out.shape == (2, 8, 4, 6) and weights.shape == (2, 2, 4, 6, 18)  # (N, heads, R, rh*rw, topk*rh*rw)
    for cls in (CompatBRA, nchwBRA):
        assert "need_weights" not in inspect.signature(cls.forward).parameters
    assert "ret_attn_mask" not in inspect.signature(BiLevelRoutingAttention2d.forward).parameters


def test_seed_use_case_512_channel_cnn_map():
    """Seed 001: BRA on a 512-channel NCHW feature map, residual as in the user's network."""
    bra = BiLevelRoutingAttention(
        dim=512, n_win=7, num_heads=8, topk=4, side_dwconv=3, auto_pad=True, layout="nchw"
    )
    x = torch.randn(1, 512, 10, 12)
    y = x + bra(x)
    assert y.shape == x.shape and bra(x).is_contiguous()  # the input's memory format
    assert bra(x.contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last
    )
    nhwc = BiLevelRoutingAttention(dim=512, n_win=7, num_heads=8, topk=4, auto_pad=True)
    nhwc.load_state_dict(bra.state_dict())
    torch.testing.assert_close(bra(x), nhwc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), atol=1e-5, rtol=1e-4)


def test_layout_errors_name_the_argument():
    with pytest.raises(ValueError, match="layout='nchw'"):
        BiLevelRoutingAttention(8, 2, 2)(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="layout='nhwc'"):
        BiLevelRoutingAttention(8, 2, 2, layout="nchw")(torch.randn(1, 4, 4, 8))
    with pytest.raises(ValueError, match="layout='nhwc'"):
        nchwBRA(8, 2, 2)(torch.randn(1, 4, 4, 8))
    with pytest.raises(ValueError, match=r"attnzoo\.BiLevelRoutingAttention\(layout='nhwc'\)"):
        nchwBRA(8, 2, 2)(torch.randn(1, 4, 4, 8))
    with pytest.raises(ValueError, match="expects"):
        BiLevelRoutingAttention(8, 2, 2)(torch.randn(1, 4, 4, 9))


def test_compat_layout_error_names_fixes_the_official_class_accepts():
    """Seed 001 feeds an NCHW CNN map to the official constructor, which has no `layout` argument: the
    error must not advise `layout='nchw'` there (that raised TypeError), but the permute or the canonical
    class, and both fixes must work."""
    m = CompatBRA(dim=8, num_heads=2, n_win=2, topk=2, auto_pad=True).double()
    x = torch.randn(1, 8, 4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x\.permute\(0, 2, 3, 1\)") as err:
        m(x)
    assert "pass layout=" not in str(err.value)
    canonical = BiLevelRoutingAttention(dim=8, num_heads=2, n_win=2, topk=2, auto_pad=True, layout="nchw")
    canonical.double().load_state_dict(m.state_dict(), strict=True)
    torch.testing.assert_close(canonical(x), m(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), rtol=0, atol=1e-10)
    with pytest.raises(TypeError, match="dtype"):
        BiLevelRoutingAttention(8, 2, 2)(torch.zeros(1, 4, 4, 8, dtype=torch.int64))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"param_routing": True}, "param_routing=True needs diff_routing"),
        ({"diff_routing": True}, "diff_routing=True needs soft_routing"),
        ({"topk": 5}, "topk must be <= 4"),
        ({"topk": 0}, "topk must be >= 1"),
        ({"side_dwconv": 4}, "side_dwconv must be odd"),
        ({"kv_downsample_mode": "fracpool"}, "not implemented"),
        ({"kv_downsample_mode": "conv"}, "not implemented"),
        ({"kv_downsample_mode": "bilinear"}, "kv_downsample_mode must be one of"),
        ({"param_attention": "none"}, "param_attention must be one of"),
        ({"num_heads": 3}, "divisible by num_heads"),
        ({"qk_dim": 6, "num_heads": 4}, "qk_dim=6 must be divisible"),
        ({"layout": "NCHW"}, "layout must be one of"),
        ({"kv_downsample_mode": "ada_avgpool", "kv_per_win": 0}, "kv_per_win must be >= 1"),
        ({"kv_downsample_mode": "avgpool", "kv_downsample_ratio": 0}, "kv_downsample_ratio must be >= 1"),
        ({"qk_scale": -1.0}, "qk_scale must be >= 0"),
    ],
)
def test_invalid_options_rejected_at_construction(kwargs, match):
    args = {"dim": 8, "num_heads": 2, "n_win": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        BiLevelRoutingAttention(**args)


def test_size_errors_at_forward():
    with pytest.raises(ValueError, match="auto_pad=True"):
        BiLevelRoutingAttention(8, 2, 2)(torch.randn(1, 5, 4, 8))
    with pytest.raises(ValueError, match="kv_downsample_ratio=4"):
        BiLevelRoutingAttention(8, 2, 2, kv_downsample_mode="maxpool")(torch.randn(1, 6, 6, 8))
    with pytest.raises(ValueError, match="H and W >= n_win=4"):
        nchwBRA(8, 2, 4)(torch.randn(1, 8, 3, 8))
    with pytest.raises(ValueError, match="topk=5 <= the number of regions"):
        nchwBRA(8, 2, 2, topk=5)(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        nchwBRA(8, 2, 2, attn_backend="cuda")


def test_errors_name_the_argument_passed():
    with pytest.raises(ValueError, match="Attention2d: channels=6 must be divisible by num_heads=4"):
        BiLevelRoutingAttention2d(6, num_heads=4)
    with pytest.raises(ValueError, match="nchwBRA: dim=6 must be divisible by num_heads=4"):
        nchwBRA(6, num_heads=4)
    with pytest.raises(ValueError, match="nchwBRA: dim must be >= 1"):
        nchwBRA(0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'auto_pad'"):
        BiLevelRoutingAttention2d(8, auto_pad=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'kv_downsample_kernel'"):
        BiLevelRoutingAttention(8, kv_downsample_kernel=3)
    assert CompatBRA(8, 2, 2, kv_downsample_kernel=3).kv_downsample_kernel == 3


def test_qk_scale_zero_falls_back_to_full_qk_dim():
    assert CompatBRA(32, 4, 7, qk_scale=0).scale == 32**-0.5
    assert CompatBRA(32, 4, 7, qk_dim=16).scale == 16**-0.5  # full qk_dim, not the head dim
    assert nchwBRA(32, 4).scale == 32**-0.5
    assert BiLevelRoutingAttention2d(32, 4, qk_scale=0).scale == 32**-0.5


def test_diff_routing_trains_router_embedding():
    m = BiLevelRoutingAttention(8, 2, 2, topk=2, param_routing=True, diff_routing=True, soft_routing=True)
    m(torch.randn(1, 4, 4, 8)).square().sum().backward()
    assert m.router.emb.weight.grad is not None and m.router.emb.weight.grad.abs().sum() > 0


def test_compiles_for_a_second_map_size_with_dynamic_shapes():
    """torch.compile recompiles with dynamic shapes at the second size; Inductor then ordered the
    symbolic strides of the routed keys and of the lepe conv's input, views saved for backward, by
    plain sympy comparison and failed (pytorch/pytorch#185510): those are fresh tensors under compile."""
    torch.manual_seed(0)
    module = attnzoo.create("bra", dim=8, num_heads=2, n_win=2, topk=4)
    compiled = torch.compile(module)
    for side in (4, 6, 8):
        x = torch.randn(2, side, side, 8, requires_grad=True)
        out = compiled(x)
        out.square().sum().backward()
        want_x = x.detach().clone().requires_grad_()
        want = module(want_x)
        want.square().sum().backward()
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad, want_x.grad, atol=1e-4, rtol=1e-4)
