"""Issue 19's gates for the token-mixing attentions against timm's and fightingcv's own modules.

    PYTHONPATH=src python benchmarks/bench_tokens.py [names...] [--rounds 7] [--no-memory] [--scale 1]
        [--isa native|avx2]

Each foreign module is built with its library's constructor at a stage size of its paper (the row
gives the input), given random weights and converted with `attnzoo.convert.convert`, so both sides
hold the same weights and compute the same function (the parity tests check that in float64; here the
float32 forward difference is printed to stderr). Dropout is 0 wherever the constructor takes it, so
the attention itself is timed. NeighborhoodAttention2d and LinearAttention have no timm or fightingcv
counterpart: they are compared with a plain reference written here from the papers (checked equal to
attnzoo's module, max |difference| <= 1e-3, else the script stops).

Batch 8 (the input column gives each shape), except 2 where a step takes several seconds on one core
(AFT_FULL, MobileViTAttention, causal linear); MobileViTv2's 32 are 8 images x 4 patch positions,
CrossFormer's 512 are 8 images x 64 groups. Forward + backward of `out.sum()` in float32, train mode,
alternating rounds; ratio = median of per-round ratios attnzoo / foreign; peak memory in a fresh
process per candidate; GFLOP/s of attnzoo's step (FLOPs from `count_flops`, math attention path) and
its share of the machine's float32 GEMM rate. `--scale k` divides spatial sizes and sequence lengths
by k (smoke runs; each module's divisibility is kept). Prints a Markdown section.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_breadth import _CloneInput, _randomize  # noqa: E402
from machine import describe_machine, gemm_gflops, reexec_with_isa  # noqa: E402

from attnzoo.cli.harness import (  # noqa: E402
    alternate,
    count_flops,
    ensure_malloc_env,
    forward_step,
    markdown_table,
    peak_memory,
    train_step,
)
from attnzoo.convert import convert  # noqa: E402
from attnzoo.mechanisms.linear import LinearAttention  # noqa: E402
from attnzoo.mechanisms.neighborhood import NeighborhoodAttention2d  # noqa: E402

warnings.filterwarnings("ignore", message=".*meshgrid.*")  # fightingcv's torch.meshgrid without indexing=
warnings.filterwarnings("ignore", message=".*timm.models.layers is deprecated.*")  # fightingcv's gfnet


def _s(n: int, scale: int, multiple: int = 1) -> int:
    """`n / scale` rounded down to a multiple of `multiple`, at least one multiple."""
    return max(multiple, n // scale // multiple * multiple)


def _new(package: str, path: str, *args: object, **kwargs: object) -> nn.Module:
    module_name, cls = path.rsplit(".", 1)
    return getattr(importlib.import_module(package + module_name), cls)(*args, **kwargs)


_fcv, _timm = partial(_new, "fightingcv_attention.attention."), partial(_new, "timm.layers.")


class _Call(nn.Module):
    """`inner` called on one tensor x as `call(inner, x)`: fightingcv's `forward(queries, keys, values)`
    as self-attention, MOA's `forward(x, H, W)`, attnzoo's GlobalFilter maps on fightingcv's tokens."""

    def __init__(self, inner: nn.Module, call: Callable[[nn.Module, Tensor], Tensor]) -> None:
        super().__init__()
        self.inner, self.call = inner, call

    def forward(self, x: Tensor) -> Tensor:
        return self.call(self.inner, x)


def _self_attend(module: nn.Module) -> nn.Module:
    return _Call(module, lambda m, x: m(x, x, x))


def _with_size(module: nn.Module, size: int) -> nn.Module:  # the (B, size * size, C) tokens of a map
    return _Call(module, lambda m, x: m(x, size, size))


def _tokens_as_map(module: nn.Module) -> nn.Module:
    def call(m: nn.Module, x: Tensor) -> Tensor:
        b, n, c = x.shape
        side = round(n**0.5)
        return m(x.view(b, side, side, c)).view(b, n, c)  # (B, N, C) -> (B, h, w, C) -> back

    return _Call(module, call)


class NeighbourhoodReference(nn.Module):
    """NAT (arXiv:2204.07143) in 2-D, dilation 1, odd kernel, written plainly: each query's k x k window
    is gathered; NATTEN's border rule shifts the window inward (start = clamp(i - k // 2, 0, L - k))."""

    def __init__(self, ours: NeighborhoodAttention2d) -> None:
        super().__init__()
        self.qkv, self.proj = copy.deepcopy(ours.qkv), copy.deepcopy(ours.proj)
        self.rpb = copy.deepcopy(ours.rpb)
        self.heads, self.k, self.scale = ours.num_heads, ours.kernel_size[0], ours.scale

    def forward(self, x: Tensor) -> Tensor:
        b, height, width, c = x.shape
        h, k = self.heads, self.k
        qkv = self.qkv(x).view(b, height, width, 3, h, c // h).permute(3, 0, 4, 1, 2, 5)  # (3, B, h, H, W, d)
        q, key, v = qkv[0] * self.scale, qkv[1], qkv[2]
        ar = torch.arange(k)
        rows = (torch.arange(height) - k // 2).clamp(0, height - k)[:, None] + ar  # (H, k) key rows
        cols = (torch.arange(width) - k // 2).clamp(0, width - k)[:, None] + ar  # (W, k) key columns
        r, s = rows[:, None, :, None], cols[None, :, None, :]  # (H, 1, k, 1), (1, W, 1, k)
        kw, vw = key[:, :, r, s], v[:, :, r, s]  # (B, h, H, W, k, k, d)
        rel_r = rows - torch.arange(height)[:, None] + k - 1  # (H, k) into the (2k - 1) table
        rel_c = cols - torch.arange(width)[:, None] + k - 1  # (W, k)
        bias = self.rpb[:, rel_r[:, None, :, None], rel_c[None, :, None, :]]  # (h, H, W, k, k)
        logits = torch.einsum("bhxyd,bhxyuvd->bhxyuv", q, kw) + bias  # (B, h, H, W, k, k)
        weights = logits.flatten(-2).softmax(-1).view_as(logits)
        out = torch.einsum("bhxyuv,bhxyuvd->bhxyd", weights, vw)  # (B, h, H, W, d)
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(b, height, width, c))  # (B, H, W, C)


class LinearReference(nn.Module):
    """Linear attention (arXiv:2006.16236) written plainly, phi = elu + 1: non-causal
    phi(Q) (phi(K)^T V) / (phi(Q) sum_j phi(k_j)); causal with the cumulative sums
    S_i = sum_{j <= i} phi(k_j) v_j^T and z_i = sum_{j <= i} phi(k_j) (one d x d state per token)."""

    def __init__(self, ours: LinearAttention) -> None:
        super().__init__()
        self.qkv, self.proj = copy.deepcopy(ours.qkv), copy.deepcopy(ours.proj)
        self.heads, self.causal, self.eps = ours.num_heads, ours.causal, ours.eps

    def forward(self, x: Tensor) -> Tensor:
        b, length, c = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, h, L, d) each
        q, k = F.elu(q) + 1, F.elu(k) + 1
        if self.causal:
            state = (k[..., :, None] * v[..., None, :]).cumsum(2)  # (B, h, L, d, d)
            num = (q[..., None, :] @ state).squeeze(-2)  # (B, h, L, 1, d) -> (B, h, L, d)
            den = (q * k.cumsum(2)).sum(-1, keepdim=True)  # (B, h, L, 1)
        else:
            num = q @ (k.transpose(-2, -1) @ v)  # (B, h, L, d)
            den = (q * k.sum(2, keepdim=True)).sum(-1, keepdim=True)  # (B, h, L, 1)
        out = num / (den + self.eps)
        return self.proj(out.transpose(1, 2).reshape(b, length, c))  # (B, h, L, d) -> (B, L, C)


@dataclass(frozen=True)
class Entry:
    """`foreign(scale)`: timm's or fightingcv's module (source "paper": attnzoo's, `reference(it)` the plain
    one); `shape(scale)`: the input's; `wrap` / `wrap_ours` adapt each side's call to one tensor."""

    source: str
    foreign: Callable[[int], nn.Module]
    shape: Callable[[int], tuple[int, ...]]
    wrap: Callable[[nn.Module], nn.Module] | None = None
    wrap_ours: Callable[[nn.Module], nn.Module] | None = None
    reference: Callable[[nn.Module], nn.Module] | None = None
    clone_input: bool = False


def _dat(s: int) -> nn.Module:  # DAT-T stage 3: 384 channels at 14 x 14, 12 heads of 32, 3 groups
    size = (_s(14, s),) * 2
    return _fcv(
        "DAT.DAttentionBaseline", q_size=size, kv_size=size, n_heads=12, n_head_channels=32, n_groups=3,
        attn_drop=0.0, proj_drop=0.0, stride=1, offset_range_factor=2, use_pe=True, dwc_pe=False,
        no_off=False, fixed_pe=False, stage_idx=2,
    )


ENTRIES: dict[str, Entry] = {
    # timm; LambdaResNet-50's c4 stage (256 wide at 14 x 14, timm's r=9), BoTNet's stage 4, HaloNet's
    "LambdaLayer (timm)": Entry(
        "timm", lambda s: _timm("lambda_layer.LambdaLayer", 256, r=9),
        lambda s: (8, 256, _s(14, s), _s(14, s)),
    ),
    "BottleneckAttn (timm)": Entry(
        "timm",
        lambda s: _timm("bottleneck_attn.BottleneckAttn", 512, feat_size=(_s(14, s),) * 2, num_heads=4),
        lambda s: (8, 512, _s(14, s), _s(14, s)),
    ),
    "HaloAttn (timm)": Entry(
        "timm", lambda s: _timm("halo_attn.HaloAttn", 256, num_heads=8, block_size=8, halo_size=3),
        lambda s: (8, 256, _s(32, s, 8), _s(32, s, 8)),
    ),
    # fightingcv; tokens (B, N, C) unless said
    "ExternalAttention (fcv)": Entry(
        "fightingcv", lambda s: _fcv("ExternalAttention.ExternalAttention", 512, S=64),
        lambda s: (8, _s(784, s), 512),
    ),
    "ScaledDotProductAttention (fcv)": Entry(  # ViT-B/16
        "fightingcv", lambda s: _fcv("SelfAttention.ScaledDotProductAttention", 768, 64, 64, 12, dropout=0.0),
        lambda s: (8, _s(197, s), 768), wrap=_self_attend,
    ),
    "SimplifiedScaledDotProductAttention (fcv)": Entry(
        "fightingcv",
        lambda s: _fcv("SimplifiedSelfAttention.SimplifiedScaledDotProductAttention", 768, 12, dropout=0.0),
        lambda s: (8, _s(197, s), 768), wrap=_self_attend,
    ),
    "EMSA (fcv)": Entry(  # ResT-Lite stage 2: 128 wide at 28 x 28, 2 heads, reduction 4
        "fightingcv",
        lambda s: _fcv("EMSA.EMSA", 128, 64, 64, 2, dropout=0.0, H=_s(28, s), W=_s(28, s), ratio=4),
        lambda s: (8, _s(28, s) ** 2, 128), wrap=_self_attend,
    ),
    "MUSEAttention (fcv)": Entry(  # Transformer-base width, 256 tokens
        "fightingcv", lambda s: _fcv("MUSEAttention.MUSEAttention", 512, 64, 64, 8, dropout=0.0),
        lambda s: (8, _s(256, s), 512), wrap=_self_attend,
    ),
    "AFT_FULL (fcv)": Entry(  # DeiT-S width, 14 x 14 tokens; batch 2: fightingcv's step takes 5 s at 8
        "fightingcv", lambda s: _fcv("AFT.AFT_FULL", 384, n=_s(196, s)), lambda s: (2, _s(196, s), 384)
    ),
    "UFOAttention (fcv)": Entry(
        "fightingcv", lambda s: _fcv("UFOAttention.UFOAttention", 384, 64, 64, 6, dropout=0.0),
        lambda s: (8, _s(196, s), 384), wrap=_self_attend,
    ),
    "OutlookAttention (fcv)": Entry(  # VOLO-D1 stage 1: (B, 28, 28, 192), 6 heads
        "fightingcv", lambda s: _fcv("OutlookAttention.OutlookAttention", 192, num_heads=6, attn_drop=0.0),
        lambda s: (8, _s(28, s), _s(28, s), 192),
    ),
    "CrissCrossAttention (fcv)": Entry(  # CCNet's 512-wide head at output stride 8
        "fightingcv", lambda s: _fcv("CrissCrossAttention.CrissCrossAttention", 512),
        lambda s: (8, 512, _s(28, s), _s(28, s)),
    ),
    "AxialAttention (fcv)": Entry(  # channels-last (B, 56, 56, 128), 8 heads
        "fightingcv", lambda s: _fcv("Axial_attention.AxialAttention", 128, heads=8, dim_index=-1),
        lambda s: (8, _s(56, s), _s(56, s), 128),
    ),
    "MobileViTAttention (fcv)": Entry(  # MobileViT-S stage 3: 96 channels at 32 x 32, width 144, patch 2;
        # batch 2: fightingcv's fixed 3-layer transformer takes 5 s a step at batch 8
        "fightingcv", lambda s: _fcv("MobileViTAttention.MobileViTAttention", 96, 144, 3, 2),
        lambda s: (2, 96, _s(32, s, 2), _s(32, s, 2)),
    ),
    "MobileViTv2Attention (fcv)": Entry(  # MobileViTv2-1.0 stage 3: 128 wide, 16 x 16 patches of 2 x 2
        "fightingcv", lambda s: _fcv("MobileViTv2Attention.MobileViTv2Attention", 128),
        lambda s: (32, _s(256, s), 128),
    ),
    "WeightedPermuteMLP (fcv)": Entry(  # ViP-S/7 stage 1: (B, 32, 32, 192), 32 segments (H = W = segments)
        "fightingcv", lambda s: _fcv("ViP.WeightedPermuteMLP", 6 * _s(32, s), _s(32, s)),
        lambda s: (8, _s(32, s), _s(32, s), 6 * _s(32, s)),
    ),
    "GlobalFilter (fcv)": Entry(  # GFNet-S: 14 x 14 tokens, 384 wide
        "fightingcv", lambda s: _fcv("gfnet.GlobalFilter", 384, h=_s(14, s), w=_s(14, s) // 2 + 1),
        lambda s: (8, _s(14, s) ** 2, 384), wrap_ours=_tokens_as_map,
    ),
    "DAttentionBaseline (fcv)": Entry("fightingcv", _dat, lambda s: (8, 384, _s(14, s), _s(14, s))),
    "Crossformer.Attention (fcv)": Entry(  # CrossFormer-T stage 1: 56 x 56 at 64 wide, 2 heads, groups 7 x 7
        "fightingcv", lambda s: _fcv("Crossformer.Attention", 64, (7, 7), 2),
        lambda s: (8 * (_s(56, s, 7) // 7) ** 2, 49, 64),
    ),
    "MOA GlobalAttention (fcv)": Entry(  # MOA-T stage 1: 56 x 56 at 96 wide, 3 heads, window 14
        "fightingcv",
        lambda s: _fcv("MOATransformer.GlobalAttention", 96, (14, 14), (_s(56, s, 14),) * 2, 3),
        lambda s: (8, _s(56, s, 14) ** 2, 96),
        wrap=lambda m: _with_size(m, m.seq_len * 14), wrap_ours=lambda m: _with_size(m, m.feat_size[0]),
    ),
    # no counterpart: the plain references above
    "NeighborhoodAttention2d (paper)": Entry(  # NAT-Mini stage 1: (B, 56, 56, 64), 2 heads, kernel 7
        "paper", lambda s: NeighborhoodAttention2d(64, num_heads=2, kernel_size=7),
        lambda s: (8, _s(56, s, 7), _s(56, s, 7), 64), reference=NeighbourhoodReference,
    ),
    "LinearAttention (paper)": Entry(
        "paper", lambda s: LinearAttention(256, num_heads=8), lambda s: (8, _s(4096, s), 256),
        reference=LinearReference,
    ),
    "LinearAttention causal (paper)": Entry(  # batch 2: the plain form holds a d x d state per token (7 s)
        "paper", lambda s: LinearAttention(256, num_heads=8, causal=True), lambda s: (2, _s(4096, s), 256),
        reference=LinearReference,
    ),
}


def build(name: str, which: str, scale: int) -> nn.Module:
    """Each side of an entry with the same random weights, in train mode, taking one tensor."""
    entry = ENTRIES[name]
    torch.manual_seed(0)
    module = _randomize(entry.foreign(scale)).train()
    if entry.reference is not None:
        return entry.reference(module).train() if which == "theirs" else module
    module = module if which == "theirs" else convert(module).train()
    wrap = entry.wrap if which == "theirs" else entry.wrap_ours
    return module if wrap is None else wrap(module)


def make_input(name: str, scale: int) -> Tensor:
    return torch.randn(*ENTRIES[name].shape(scale), generator=torch.Generator().manual_seed(1))


def make_step(name: str, which: str, scale: int, forward_only: bool = False) -> Callable[[], object]:
    """Factory for `peak_memory` (a fresh process): one forward + backward step (forward only where
    the foreign module cannot run backward)."""
    module = build(name, which, scale)
    module = _CloneInput(module) if ENTRIES[name].clone_input else module
    x = make_input(name, scale)
    return forward_step(module, [x]) if forward_only else train_step(module, [x])


def check_outputs(name: str, scale: int) -> float:
    """Max |attnzoo - foreign| of one float32 forward in eval mode (no dropout); above 1e-3 against a
    plain reference it stops the script."""
    x = make_input(name, scale)
    with torch.no_grad():
        outs = [build(name, w, scale).eval()(x) for w in ("attnzoo", "theirs")]
    outs = [o[0] if isinstance(o, tuple) else o for o in outs]
    diff = float((outs[0] - outs[1]).abs().max())
    print(f"{name}: max |attnzoo - foreign| = {diff:.2e} (forward, float32)", file=sys.stderr)
    if ENTRIES[name].reference is not None and not diff <= 1e-3:
        raise SystemExit(f"{name}: attnzoo differs from the plain reference by {diff:.3g} > 1e-3")
    return diff


def _reason(exc: BaseException, width: int = 160) -> str:
    text = str(exc).splitlines()[0][:width] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _steps(name: str, scale: int) -> tuple[dict[str, Callable[[], object]], bool, str]:
    """Both steps, run once; forward-only steps where a backward fails (the note says whose)."""
    steps = {w: make_step(name, w, scale) for w in ("attnzoo", "theirs")}
    failed = []
    for which, step in steps.items():
        try:
            step()
        except RuntimeError as exc:
            failed.append(f"{which}'s backward fails: {_reason(exc, 100)}")
    if not failed:
        return steps, False, ""
    steps = {w: make_step(name, w, scale, True) for w in ("attnzoo", "theirs")}
    for step in steps.values():
        step()
    return steps, True, f" (forward only: {'; '.join(failed)})"


def measure(name: str, args: argparse.Namespace, gemm: float) -> list[str]:
    """One table row."""
    shape = "x".join(map(str, ENTRIES[name].shape(args.scale)))
    try:
        check_outputs(name, args.scale)
        steps, forward_only, note = _steps(name, args.scale)
    except Exception as exc:  # a module that cannot convert or cannot run: the row says why
        print(f"{name}: skipped ({_reason(exc)})", file=sys.stderr)
        return [name, shape, "-", "-", f"not run: {_reason(exc)}", "-", "-", "-"]
    timing = alternate(steps, rounds=args.rounds, warmup=2)
    peaks = {w: "-" for w in steps}
    for w in () if args.no_memory else steps:
        target = {"name": name, "which": w, "scale": args.scale, "forward_only": forward_only}
        peaks[w] = f"{peak_memory('bench_tokens:make_step', target) / 2**20:.0f}"
    flops = count_flops(steps["attnzoo"])  # 0 where only uncounted ops run (FFTs)
    rate = flops / timing.median("attnzoo") / 1e9
    cells = [f"{timing.median(w) * 1e3:.1f}" for w in steps] + [f"{timing.ratio('attnzoo', 'theirs'):.2f}"]
    gflops = f"{rate:.1f} ({rate / gemm:.0%})" if flops else "- (FFTs not counted)"
    return [name + note, shape, *cells, peaks["attnzoo"], peaks["theirs"], gflops]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help="entries (default: all); see ENTRIES")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--scale", type=int, default=1, help="divide spatial sizes / lengths (smoke runs)")
    parser.add_argument("--isa", default="native", help="'avx2': hold MKL, oneDNN and torch to AVX2 code")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in ENTRIES]
    if unknown or args.scale < 1:
        parser.error(f"unknown entries {unknown} (known: {list(ENTRIES)})" if unknown else "--scale >= 1")
    reexec_with_isa(args.isa)
    ensure_malloc_env()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    gemm, started = gemm_gflops(), time.time()
    rows = []
    for name in args.names or list(ENTRIES):
        rows.append(measure(name, args, gemm))
        print(" | ".join(rows[-1]), f"({time.time() - started:.0f} s)", file=sys.stderr)
    scaled = f", sizes divided by {args.scale}" if args.scale > 1 else ""
    print(f"### Token mixers against timm / fightingcv (issue 19), {describe_machine()}\n")
    print(
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, float32 forward + backward{scaled}, "
        f"float32 GEMM {gemm:.0f} GFLOP/s; ratio = median of per-round ratios attnzoo / foreign; "
        "(paper) rows compare with a plain reference written from the paper.\n"
    )
    header = ["entry", "input", "attnzoo ms", "foreign ms", "ratio", "attnzoo peak MiB", "foreign peak MiB"]
    print(markdown_table([*header, "attnzoo GFLOP/s (of GEMM)"], rows))
    print(f"\n(total {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
