"""BiFormer BRA: attnzoo vs a plain reference that follows the official algorithm step by step.

Run from the repository root: ``PYTHONPATH=src python benchmarks/bench_biformer.py`` (about 3-5 min).
Forward + backward, float32, alternating rounds; peak memory of one step in a fresh process.

The references below are written from the official ``ops/bra_legacy.py`` and ``ops/bra_nchw.py``
(+ ``ops/torch/rrsda.py``) algorithms, step by step: window rearranges by permute + reshape (what
einops does), the top-k key/value gather by ``torch.gather`` on an expanded view, explicit
``softmax(q k^T) v``. They load attnzoo's state_dicts, and the script checks both give the same
output before timing.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo.cli.harness import (
    alternate,
    count_flops,
    ensure_malloc_env,
    markdown_table,
    peak_memory,
    train_step,
)
from attnzoo.mechanisms.biformer import BiLevelRoutingAttention
from attnzoo.mechanisms.biformer_nchw import BiLevelRoutingAttention2d


class _QKV(nn.Module):
    def __init__(self, dim: int, qk_dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)


class _Router(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Identity()


class ReferenceBRA(nn.Module):
    """Official legacy BRA algorithm (identity kv, hard routing, qkvo), NHWC in and out."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        topk: int = 4,
        side_dwconv: int = 3,
        auto_pad: bool = False,
    ) -> None:
        super().__init__()
        self.dim, self.qk_dim, self.num_heads, self.n_win, self.topk = dim, dim, num_heads, n_win, topk
        self.scale, self.auto_pad = dim**-0.5, auto_pad
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.router = _Router()
        self.qkv = _QKV(dim, dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n_win, c, m = self.n_win, self.qk_dim, self.num_heads
        n, h_in, w_in, dim = x.shape
        pad_b, pad_r = (-h_in) % n_win, (-w_in) % n_win
        if self.auto_pad:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        _, hh, ww, _ = x.shape
        h, w, p2 = hh // n_win, ww // n_win, n_win * n_win
        # "n (j h) (i w) c -> n (j i) h w c"
        x = x.reshape(n, n_win, h, n_win, w, dim).permute(0, 1, 3, 2, 4, 5).reshape(n, p2, h, w, dim)
        q, kv = self.qkv.qkv(x).split([c, c + dim], dim=-1)
        q_pix = q.reshape(n, p2, h * w, c)
        kv_pix = kv.reshape(n * p2, h, w, c + dim).permute(0, 3, 1, 2)  # kv_down = identity
        kv_pix = kv_pix.reshape(n, p2, c + dim, h * w).permute(0, 1, 3, 2).reshape(n, p2, h * w, c + dim)
        q_win, k_win = q.mean([2, 3]), kv[..., :c].mean([2, 3])
        v_img = kv[..., c:].reshape(n, n_win, n_win, h, w, dim).permute(0, 5, 1, 3, 2, 4)
        lepe = self.lepe(v_img.reshape(n, dim, hh, ww).contiguous())
        lepe = lepe.permute(0, 2, 3, 1).reshape(n, hh, ww, dim)
        logits = (q_win.detach() * self.scale) @ k_win.detach().transpose(-2, -1)
        top, r_idx = torch.topk(logits, k=self.topk, dim=-1)
        top.softmax(-1)  # r_weight (unused without soft routing)
        w2, ckv = h * w, c + dim
        sel = torch.gather(
            kv_pix.view(n, 1, p2, w2, ckv).expand(-1, p2, -1, -1, -1),
            dim=2,
            index=r_idx.view(n, p2, self.topk, 1, 1).expand(-1, -1, -1, w2, ckv),
        )
        k_sel, v_sel = sel.split([c, dim], dim=-1)
        # "n p2 k w2 (m c) -> (n p2) m c (k w2)" and "(n p2) m (k w2) c"
        k_sel = (
            k_sel.reshape(n * p2, self.topk, w2, m, c // m)
            .permute(0, 3, 4, 1, 2)
            .reshape(n * p2, m, c // m, -1)
        )
        v_sel = (
            v_sel.reshape(n * p2, self.topk, w2, m, dim // m)
            .permute(0, 3, 1, 2, 4)
            .reshape(n * p2, m, -1, dim // m)
        )
        q_pix = q_pix.reshape(n * p2, w2, m, c // m).permute(0, 2, 1, 3)
        attn = ((q_pix * self.scale) @ k_sel).softmax(dim=-1)
        out = attn @ v_sel  # (n*p2, m, w2, d)
        out = (
            out.reshape(n, n_win, n_win, m, h, w, dim // m)
            .permute(0, 1, 4, 2, 5, 3, 6)
            .reshape(n, hh, ww, dim)
        )
        out = self.wo(out + lepe)
        if self.auto_pad and (pad_b or pad_r):
            out = out[:, :h_in, :w_in, :].contiguous()
        return out


class ReferenceNCHW(nn.Module):
    """Official ``nchwBRA`` + ``regional_routing_attention_torch`` algorithm (H, W divisible)."""

    def __init__(
        self, dim: int, num_heads: int = 8, n_win: int = 7, topk: int = 4, side_dwconv: int = 3
    ) -> None:
        super().__init__()
        self.dim, self.num_heads, self.n_win, self.topk, self.scale = dim, num_heads, n_win, topk, dim**-0.5
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.qkv_linear = nn.Conv2d(dim, 3 * dim, 1)
        self.output_linear = nn.Conv2d(dim, dim, 1)

    def _grid2seq(self, x: Tensor, rh: int, rw: int) -> Tensor:
        b, c, hh, ww = x.shape
        x = x.view(b, self.num_heads, c // self.num_heads, hh // rh, rh, ww // rw, rw)
        return torch.einsum("bmdhpwq->bmhwpqd", x).flatten(2, 3).flatten(-3, -2)

    def forward(self, x: Tensor) -> Tensor:
        n, c, hh, ww = x.shape
        rh, rw = hh // self.n_win, ww // self.n_win
        q, k, v = self.qkv_linear(x).chunk(3, dim=1)
        q_r = F.avg_pool2d(q.detach(), (rh, rw), ceil_mode=True, count_include_pad=False)
        k_r = F.avg_pool2d(k.detach(), (rh, rw), ceil_mode=True, count_include_pad=False)
        a_r = q_r.permute(0, 2, 3, 1).flatten(1, 2) @ k_r.flatten(2, 3)
        idx = torch.topk(a_r, k=self.topk, dim=-1).indices.unsqueeze(1).expand(-1, self.num_heads, -1, -1)
        qs, ks, vs = (self._grid2seq(t, rh, rw) for t in (q, k, v))
        b, m, nreg, reg, d = ks.shape
        gidx = idx.reshape(b, m, nreg, self.topk, 1, 1).expand(-1, -1, -1, -1, reg, d)
        kg = torch.gather(ks.view(b, m, 1, nreg, reg, d).expand(-1, -1, nreg, -1, -1, -1), 3, gidx)
        vg = torch.gather(vs.view(b, m, 1, nreg, reg, d).expand(-1, -1, nreg, -1, -1, -1), 3, gidx)
        attn = ((qs * self.scale) @ kg.flatten(-3, -2).transpose(-1, -2)).softmax(-1)
        out = attn @ vg.flatten(-3, -2)  # (b, m, nreg, reg, d)
        out = out.view(b, m, hh // rh, ww // rw, rh, rw, d)
        out = torch.einsum("bmhwpqd->bmdhpwq", out).reshape(b, c, hh, ww)
        return self.output_linear(out + self.lepe(v))


CASES = {
    # name: (ours factory kwargs, reference kwargs, input shape, layout of the input)
    "bra_56": (
        {"dim": 64, "n_win": 7, "topk": 4},
        {"dim": 64, "n_win": 7, "topk": 4},
        (2, 56, 56, 64),
        "nhwc",
    ),
    "bra_seed": (
        {"dim": 512, "n_win": 7, "num_heads": 8, "topk": 4, "side_dwconv": 3, "auto_pad": True},
        {"dim": 512, "n_win": 7, "num_heads": 8, "topk": 4, "side_dwconv": 3, "auto_pad": True},
        (8, 28, 28, 512),
        "nhwc",
    ),
    "bra_seed_nchw": (
        {
            "dim": 512,
            "n_win": 7,
            "num_heads": 8,
            "topk": 4,
            "side_dwconv": 3,
            "auto_pad": True,
            "layout": "nchw",
        },
        {"dim": 512, "n_win": 7, "num_heads": 8, "topk": 4, "side_dwconv": 3, "auto_pad": True},
        (8, 512, 28, 28),
        "nchw",
    ),
    "nchw_56": (
        {"channels": 64, "n_win": 7, "topk": 4},
        {"dim": 64, "n_win": 7, "topk": 4},
        (2, 64, 56, 56),
        "nchw",
    ),
}


class _ToNHWC(nn.Module):
    """The reference on NCHW maps, as a CNN user would call the official module."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def build(case: str, which: str) -> tuple[nn.Module, Tensor]:
    ours_kw, ref_kw, shape, layout = CASES[case]
    torch.manual_seed(0)
    if case.startswith("nchw"):
        ours: nn.Module = BiLevelRoutingAttention2d(**ours_kw)
        ref: nn.Module = ReferenceNCHW(**ref_kw)
    else:
        ours = BiLevelRoutingAttention(**ours_kw)
        ref = ReferenceBRA(**ref_kw)
        ref = _ToNHWC(ref) if layout == "nchw" else ref
    target = ref.inner if isinstance(ref, _ToNHWC) else ref
    target.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    return (ours if which == "ours" else ref), x


def make_step(case: str, which: str):  # noqa: ANN201 (zero-argument step for peak_memory)
    module, x = build(case, which)
    return train_step(module, [x])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds per case")
    args = parser.parse_args()
    ensure_malloc_env()
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, here)
    rows = []
    for case, (_, _, shape, _) in CASES.items():
        ours, x = build(case, "ours")
        ref, _ = build(case, "ref")
        with torch.no_grad():
            err = (ours(x) - ref(x)).abs().max().item()
        if err > 1e-3:
            raise RuntimeError(f"{case}: attnzoo and the reference differ by {err}")
        steps = {"ours": train_step(ours, [x]), "ref": train_step(ref, [x])}
        timing = alternate(steps, rounds=args.rounds, warmup=2)
        flops = count_flops(steps["ours"])
        mem = {k: peak_memory("bench_biformer:make_step", {"case": case, "which": k}) / 2**20 for k in steps}
        rows.append(
            [
                f"`{case}` {tuple(shape)}",
                f"{timing.median('ref') * 1e3:.1f}",
                f"{timing.median('ours') * 1e3:.1f}",
                f"{1 / timing.ratio('ours', 'ref'):.2f}x",
                f"{mem['ref']:.0f}",
                f"{mem['ours']:.0f}",
                f"{flops / timing.median('ours') / 1e9:.0f}",
            ]
        )
        print(f"{case}: done", file=sys.stderr)
    print("## BiFormer Bi-Level Routing Attention (issue 7)\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, forward + backward.")
    print("Reference: the official algorithm step by step (`benchmarks/bench_biformer.py`).\n")
    print(
        markdown_table(
            [
                "case",
                "reference ms",
                "attnzoo ms",
                "speed-up",
                "reference MB",
                "attnzoo MB",
                "attnzoo GFLOP/s",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
