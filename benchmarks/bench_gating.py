"""Gating family benchmark: SE, CBAM (channel, spatial, block, residual block), SK, dual gated.

Forward + backward in float32 (training mode), alternating rounds of attnzoo's module, a plain
reference written here that follows the seed's algorithm step by step, and timm's module configured
alike when timm is installed. Also: peak memory per step (fresh process), and the bytes each step
moves (every aten op reading its inputs and writing its outputs once, counted by a dispatch mode)
against the machine's copy bandwidth.

Run from the repository root: ``PYTHONPATH=src python benchmarks/bench_gating.py [names...]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from attnzoo import (
    CBAM,
    CBAtten_Res,
    ChannelAttention,
    DualGatedAttention,
    SKConv,
    SpatialAttention,
    SqueezeExcite,
)
from attnzoo.cli.harness import alternate, ensure_malloc_env, markdown_table, peak_memory, train_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import copy_gbps  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Seed-following references (the seed documents' forward passes, step by step)


class SeedSE(nn.Module):
    def __init__(self, channel: int, reduction: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channel, channel // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channel // reduction, channel, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):
        b, c, _, _ = x.size()
        y = self.avg_pool(x).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return x * y.expand_as(x)


class SeedCA(nn.Module):
    def __init__(self, in_channels: int, reduction: int) -> None:
        super().__init__()
        self.avg_pool, self.max_pool = nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1)
        self.sharedMLP = nn.Sequential(
            nn.Conv2d(in_channels, in_channels // reduction, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels // reduction, in_channels, 1, bias=False),
        )
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        avgout = self.sharedMLP(self.avg_pool(x))
        maxout = self.sharedMLP(self.max_pool(x))
        w = self.sigmoid(avgout + maxout)
        return x * w.expand_as(x)


class SeedSA(nn.Module):
    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        avgout = torch.mean(x, dim=1, keepdim=True)
        maxout, _ = torch.max(x, dim=1, keepdim=True)
        x1 = torch.cat([avgout, maxout], dim=1)
        w = self.sigmoid(self.conv(x1))
        return x * w


class SeedCBAM(nn.Module):
    def __init__(self, channels: int, reduction: int, kernel_size: int) -> None:
        super().__init__()
        self.ca, self.sa = SeedCA(channels, reduction), SeedSA(kernel_size)

    def forward(self, x):
        return self.sa(self.ca(x))


class SeedCBAttenRes(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=2, reduction=4) -> None:
        super().__init__()
        self.max_pool = nn.MaxPool2d(3, stride=stride, padding=1)
        self.conv_res = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, bias=True)
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.ca, self.sa = SeedCA(out_channels, reduction), SeedSA(kernel_size)

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.sa(self.ca(out))
        residual = self.conv_res(self.max_pool(residual))
        out += residual
        return self.relu(out)


class SeedSKEConv(nn.Module):
    """The seed's SKEConv with only its crash fixed (``unsqueeze`` instead of ``unsqueeze_``)."""

    def __init__(self, in_channels, M=2, G=2, stride=1, L=32, reduction=2) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(in_channels, in_channels, 3 + i * 2, stride=stride, padding=1 + i, groups=G),
                    nn.BatchNorm2d(in_channels),
                    nn.ReLU(inplace=True),
                )
                for i in range(M)
            ]
        )
        self.d = max(int(in_channels / reduction), L)
        self.fc = nn.Linear(in_channels, self.d)
        self.fcs = nn.ModuleList([nn.Linear(self.d, in_channels) for _ in range(M)])
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        feas = attention_vectors = torch.empty(0)
        for i, conv in enumerate(self.convs):
            fea = conv(x).unsqueeze(dim=1)
            feas = fea if i == 0 else torch.cat([feas, fea], dim=1)
        fea_u = torch.sum(feas, dim=1)
        fea_s = fea_u.mean(-1).mean(-1)
        fea_z = self.fc(fea_s)
        for i, fc in enumerate(self.fcs):
            vector = fc(fea_z).unsqueeze(dim=1)
            attention_vectors = vector if i == 0 else torch.cat([attention_vectors, vector], dim=1)
        attention_vectors = self.softmax(attention_vectors).unsqueeze(-1).unsqueeze(-1)
        return (feas * attention_vectors).sum(dim=1)


class SeedDual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()

        def cbr():
            return nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1, bias=True),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            )

        self.space_attention, self.channel_attention = cbr(), cbr()
        self.sigmoid = nn.Sigmoid()

    def forward(self, x4_0):
        out_c1 = self.sigmoid(nn.AdaptiveMaxPool2d((1, 1))(x4_0))
        channel_att = self.channel_attention(x4_0 * out_c1)
        x = x4_0 + channel_att
        out_s1 = self.sigmoid(torch.max(x, 1)[0].unsqueeze(1))
        space_att = self.space_attention(x * out_s1)
        return x + space_att


# ----------------------------------------------------------------------------------------------
# Workloads: name -> (input shape, {candidate: factory}, rounds)


def _timm(path: str, name: str) -> Callable[..., nn.Module] | None:
    try:
        module = __import__(path, fromlist=[name])
    except ImportError:
        return None
    return getattr(module, name)


def workloads() -> dict[str, tuple[tuple[int, ...], dict[str, Callable[[], nn.Module]], int]]:
    big, sk = (8, 256, 56, 56), (8, 64, 56, 56)
    se_t = _timm("timm.layers.squeeze_excite", "SEModule")
    ca_t = _timm("timm.layers.cbam", "ChannelAttn")
    sa_t = _timm("timm.layers.cbam", "SpatialAttn")
    cbam_t = _timm("timm.layers.cbam", "CbamModule")
    sk_t = _timm("timm.layers.selective_kernel", "SelectiveKernel")
    w: dict[str, tuple[tuple[int, ...], dict[str, Callable[[], nn.Module]], int]] = {
        "se": (big, {"attnzoo": lambda: SqueezeExcite(256, 16), "seed": lambda: SeedSE(256, 16)}, 11),
        "cbam_channel": (
            big,
            {"attnzoo": lambda: ChannelAttention(256, 16), "seed": lambda: SeedCA(256, 16)},
            11,
        ),
        "cbam_spatial": (
            big,
            {"attnzoo": lambda: SpatialAttention(kernel_size=7), "seed": lambda: SeedSA(7)},
            11,
        ),
        "cbam": (big, {"attnzoo": lambda: CBAM(256, 16, 7), "seed": lambda: SeedCBAM(256, 16, 7)}, 11),
        "cbam_res": (
            big,
            {"attnzoo": lambda: CBAtten_Res(256, 256), "seed": lambda: SeedCBAttenRes(256, 256)},
            7,
        ),
        "sk": (sk, {"attnzoo": lambda: SKConv(64), "seed": lambda: SeedSKEConv(64)}, 9),
        "dual_gated": (big, {"attnzoo": lambda: DualGatedAttention(256), "seed": lambda: SeedDual(256)}, 5),
    }
    # timm, configured alike; ours with the same options (BatchNorm where timm has one).
    if se_t is not None:
        w["se"][1].update({"timm": lambda: se_t(256, rd_channels=16, bias=False)})
    if ca_t is not None:
        w["cbam_channel"][1].update({"timm": lambda: ca_t(256, rd_channels=16)})
    if sa_t is not None:
        w["cbam_spatial"][1].update(
            {
                "attnzoo+bn": lambda: SpatialAttention(kernel_size=7, norm_layer=nn.BatchNorm2d),
                "timm": lambda: sa_t(7),
            }
        )
    if cbam_t is not None:
        w["cbam"][1].update(
            {
                "attnzoo+bn": lambda: CBAM(256, 16, 7, norm_layer=nn.BatchNorm2d),
                "timm": lambda: cbam_t(256, rd_channels=16, spatial_kernel_size=7),
            }
        )
    if sk_t is not None:
        w["sk"][1].update(
            {
                "attnzoo+bn": lambda: SKConv(64, fuse_norm_act=True),
                "timm": lambda: sk_t(
                    64, 64, kernel_size=[3, 5], groups=2, rd_channels=32, keep_3x3=False, split_input=False
                ),
            }
        )
    return w


_SELF = "benchmarks.bench_gating"  # importable from the repository root (peak_memory's subprocess)


def pairs(factories: dict[str, Callable[[], nn.Module]]) -> list[tuple[str, str]]:
    """(ours, baseline) comparisons: ours against the seed reference, and ours configured like timm
    (``attnzoo+bn``, where timm's module has a BatchNorm ours lacks by default) against timm."""
    out = []
    for base in ("seed", "timm"):
        if base in factories:
            out.append(("attnzoo+bn" if base == "timm" and "attnzoo+bn" in factories else "attnzoo", base))
    return out


def make_step(workload: str, candidate: str, seed: int = 0) -> Callable[[], object]:
    """Build one candidate and its input; return its forward+backward step (also for peak_memory)."""
    shape, factories, _ = workloads()[workload]
    torch.manual_seed(seed)
    module = factories[candidate]().train()
    x = torch.randn(*shape)
    return train_step(module, [x])


# ----------------------------------------------------------------------------------------------
# Bytes moved: every aten op reads its inputs and writes its outputs once (a lower bound)

_INDEX_WRITES = {"scatter_add_", "scatter_add", "scatter_", "index_put_", "index_add_"}
_INDEX_READS = {"gather", "index_select"}
_NO_TRAFFIC = {"detach", "alias", "_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty"}
_SHAPE_ONLY_SELF = {"adaptive_max_pool2d_backward", "max_pool2d_with_indices_backward"}


def _nbytes(t: object) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    return min(t.numel(), t.untyped_storage().nbytes() // t.element_size()) * t.element_size()


class ByteCounter(TorchDispatchMode):
    """Sum of input + output tensor bytes of every aten op (stride-0 expansions count once)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        if func.is_view or name in _NO_TRAFFIC:
            return out
        kwargs = {k: v for k, v in kwargs.items() if k != "out"}  # out= is written, counted as output
        flat_in = list(torch.utils._pytree.tree_leaves((args, kwargs)))
        if name in _INDEX_WRITES:  # touches only the indexed elements of self
            self.bytes += 2 * sum(_nbytes(a) for a in flat_in[1:])
            return out
        if name in _INDEX_READS:  # reads only the indexed elements
            self.bytes += sum(_nbytes(a) for a in flat_in[2:]) + 2 * _nbytes(out)
            return out
        if name in _SHAPE_ONLY_SELF:
            flat_in = [a for i, a in enumerate(flat_in) if i != 1]
        self.bytes += sum(_nbytes(a) for a in flat_in)
        self.bytes += sum(_nbytes(o) for o in torch.utils._pytree.tree_leaves(out))
        return out


def bytes_moved(step: Callable[[], object]) -> int:
    step()  # settle lazy initialisation
    with ByteCounter() as counter:
        step()
    return counter.bytes


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="workloads (default: all)")
    parser.add_argument("--rounds", type=int, default=0, help="override the rounds per workload")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = parser.parse_args(argv)
    table = workloads()
    names = args.names or list(table)
    bandwidth = copy_gbps()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, copy bandwidth {bandwidth:.1f} GB/s "
        "(read + write)\n",
        file=sys.stderr,
    )
    rows = []
    for name in names:
        shape, factories, rounds = table[name]
        steps = {cand: make_step(name, cand) for cand in factories}
        size = 4 * torch.Size(shape).numel()  # bytes of the float32 input
        timing = alternate(steps, rounds=args.rounds or rounds, warmup=2)
        for cand in factories:
            moved = bytes_moved(steps[cand])
            secs = timing.median(cand)
            target = {"workload": name, "candidate": cand}
            mem = "-" if args.no_memory else f"{peak_memory(_SELF + ':make_step', target) / 2**20:.0f}"
            ratios = [
                f"{timing.ratio(ours, base):.2f} vs {base}" for ours, base in pairs(factories) if ours == cand
            ]
            rows.append(
                (
                    name,
                    "x".join(map(str, shape)),
                    cand,
                    f"{secs * 1e3:.1f}",
                    ", ".join(ratios) or "-",
                    mem,
                    f"{moved / 1e9:.2f} ({moved / size:.0f})",
                    f"{moved / secs / 1e9:.1f} ({moved / secs / 1e9 / bandwidth:.0%})",
                )
            )
            print(" | ".join(rows[-1]), file=sys.stderr)
        del steps
    header = (
        "workload",
        "input",
        "candidate",
        "median ms",
        "ratio (median of rounds)",
        "peak MB",
        "GB moved (input sizes)",
        "GB/s (of copy bw)",
    )
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    ensure_malloc_env()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    raise SystemExit(main())
