"""Issue 18's gates against timm's and fightingcv's own modules, at a ResNet-50 stage size.

    PYTHONPATH=src python benchmarks/bench_breadth.py [names...] [--shape 8 256 56 56] [--rounds 7]
        [--isa native|avx2]

Each foreign module is built with its library's constructor, given random weights, and converted with
`attnzoo.convert.convert` (`from_timm` / `from_fightingcv`), so both sides hold the same weights and
compute the same function (the parity tests check that in float64). Forward + backward of
`out.sum()` in float32, alternating rounds; ratio = median of per-round ratios attnzoo / foreign;
peak memory in a fresh process per candidate; bytes moved = input + output bytes of every aten op
(`bench_gating.ByteCounter`) against the measured copy bandwidth. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_gating import bytes_moved  # noqa: E402
from machine import copy_gbps, describe_machine, reexec_with_isa  # noqa: E402

from attnzoo.cli.harness import (  # noqa: E402
    alternate,
    ensure_malloc_env,
    forward_step,
    markdown_table,
    peak_memory,
    train_step,
)  # noqa: E402
from attnzoo.convert import convert  # noqa: E402

FCV = "fightingcv_attention.attention."


def _timm(name: str) -> Callable[[int], nn.Module]:
    def make(c: int) -> nn.Module:
        from timm.layers import create_attn

        return create_attn(name, c)

    return make


def _fcv(path: str, **kwargs: object) -> Callable[[int], nn.Module]:
    module_name, cls = path.rsplit(".", 1)

    def make(c: int) -> nn.Module:
        factory = getattr(importlib.import_module(FCV + module_name), cls)
        args = {k: (c if v == "C" else v) for k, v in kwargs.items()}
        return factory(**args)

    return make


def _timm_gather_excite(c: int) -> nn.Module:
    from timm.layers import GatherExcite
    from timm.layers.helpers import make_divisible
    from timm.layers.mlp import ConvMlp

    module = GatherExcite(c, use_mlp=False)
    module.mlp = ConvMlp(c, make_divisible(c / 16, 1, round_limit=0.0), act_layer=nn.ReLU)
    return module


# fightingcv hard-codes 512 channels in these (and DANet's channel branch 7 x 7 positions whatever H
# and W it is given): run them where they run
SHAPES = {
    "S2Attention (fcv)": [8, 512, 28, 28],
    "DAModule (fcv)": [8, 512, 7, 7],
    # fightingcv's dilated convolutions shrink the map by 2 each, so only 7 x 7 (-> 1 x 1, broadcast)
    # runs: ResNet-50's last stage
    "BAMBlock (fcv)": [8, 2048, 7, 7],
}
# fightingcv writes into its input, which autograd refuses for a leaf: both sides get a copy
CLONE_INPUT = {"PSA (fcv)"}

# name -> (source, factory of the foreign module for C channels)
ENTRIES: dict[str, tuple[str, Callable[[int], nn.Module]]] = {
    **{
        f"{name} (timm)": ("timm", _timm(name))
        for name in (
            "se",
            "ese",
            "eca",
            "ecam",
            "ceca",
            "gc",
            "gca",
            "cbam",
            "lcbam",
            "sk",
            "splat",
            "coord",
            "scoord",
            "ela",
            "strip",
            "bat",
            "nl",
        )
    },  # fmt: skip
    # create_attn("ge", c) itself fails in timm 1.0 (ConvMlp gets act_layer twice): build the module
    # its constructor means to build, as tests/mechanisms/test_gather_excite.py does
    "ge (timm)": ("timm", lambda c: _timm_gather_excite(c)),
    "SEAttention (fcv)": ("fightingcv", _fcv("SEAttention.SEAttention", channel="C", reduction=16)),
    "CBAMBlock (fcv)": ("fightingcv", _fcv("CBAM.CBAMBlock", channel="C", reduction=16, kernel_size=7)),
    "SKAttention (fcv)": ("fightingcv", _fcv("SKAttention.SKAttention", channel="C", reduction=16)),
    "BAMBlock (fcv)": ("fightingcv", _fcv("BAM.BAMBlock", channel="C", reduction=16)),
    "ECAAttention (fcv)": ("fightingcv", _fcv("ECAAttention.ECAAttention", kernel_size=3)),
    "SpatialGroupEnhance (fcv)": ("fightingcv", _fcv("SGE.SpatialGroupEnhance", groups=8)),
    "ShuffleAttention (fcv)": ("fightingcv", _fcv("ShuffleAttention.ShuffleAttention", channel="C", G=8)),
    "SimAM (fcv)": ("fightingcv", _fcv("SimAM.SimAM")),
    "TripletAttention (fcv)": ("fightingcv", _fcv("TripletAttention.TripletAttention")),
    "CoordAtt (fcv)": ("fightingcv", _fcv("CoordAttention.CoordAtt", inp="C", oup="C")),
    "PSA (fcv)": ("fightingcv", _fcv("PSA.PSA", channel="C")),
    "ParallelPolarized (fcv)": (
        "fightingcv",
        _fcv("PolarizedSelfAttention.ParallelPolarizedSelfAttention", channel="C"),
    ),
    "SequentialPolarized (fcv)": (
        "fightingcv",
        _fcv("PolarizedSelfAttention.SequentialPolarizedSelfAttention", channel="C"),
    ),
    "ParNetAttention (fcv)": ("fightingcv", _fcv("ParNetAttention.ParNetAttention", channel="C")),
    "DoubleAttention (fcv)": (
        "fightingcv",
        _fcv("A2Atttention.DoubleAttention", in_channels="C", c_m=128, c_n=128),
    ),
    "S2Attention (fcv)": ("fightingcv", _fcv("S2Attention.S2Attention", channels="C")),
    "CoTAttention (fcv)": ("fightingcv", _fcv("CoTAttention.CoTAttention", dim="C", kernel_size=3)),
    "DAModule (fcv)": ("fightingcv", _fcv("DANet.DAModule", d_model="C", kernel_size=3, H=7, W=7)),
}


def _randomize(module: nn.Module) -> nn.Module:
    """Random weights and BatchNorm statistics (a freshly initialised gate is often the identity)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def build(name: str, which: str, shape: list[int]) -> nn.Module:
    torch.manual_seed(0)
    theirs = _randomize(ENTRIES[name][1](shape[1])).train()
    return theirs if which == "theirs" else convert(theirs).train()


class _CloneInput(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.clone())


# fightingcv's PSA cannot run backward (it writes into a tensor autograd saved): forward only
FORWARD_ONLY = {"PSA (fcv)"}


def make_step(name: str, which: str, shape: list[int]) -> Callable[[], object]:
    """Factory for `peak_memory` (a fresh process): one forward + backward step (forward only
    for the entries in FORWARD_ONLY)."""
    shape = SHAPES.get(name, shape)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    module = build(name, which, shape)
    module = _CloneInput(module) if name in CLONE_INPUT else module
    return forward_step(module, [x]) if name in FORWARD_ONLY else train_step(module, [x])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help="entries (default: all); see ENTRIES")
    parser.add_argument("--shape", type=int, nargs=4, default=[8, 256, 56, 56])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--isa", default="native", help="'avx2': hold MKL, oneDNN and torch to AVX2 code")
    args = parser.parse_args()
    reexec_with_isa(args.isa)
    ensure_malloc_env()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    bandwidth, started = copy_gbps(), time.time()
    rows = []
    for name in args.names or list(ENTRIES):
        try:
            steps = {w: make_step(name, w, args.shape) for w in ("attnzoo", "theirs")}
            for step in steps.values():
                step()
        except (ImportError, TypeError, ValueError, RuntimeError) as exc:
            reason = str(exc).splitlines()[0][:160]
            print(f"{name}: skipped ({reason})", file=sys.stderr)
            rows.append([name, "-", "-", f"not run: {reason}", "-", "-", "-", "-"])
            continue
        timing = alternate(steps, rounds=args.rounds, warmup=2)
        peaks = {w: "-" for w in steps}
        for w in () if args.no_memory else steps:
            target = {"name": name, "which": w, "shape": args.shape}
            peaks[w] = f"{peak_memory('bench_breadth:make_step', target) / 2**20:.0f}"
        moved = {w: bytes_moved(steps[w]) for w in steps}
        cells = [f"{timing.median(w) * 1e3:.1f}" for w in steps]
        rates = [
            f"{moved[w] / 1e9:.2f} GB, {moved[w] / timing.median(w) / 1e9 / bandwidth:.0%}" for w in steps
        ]
        name_cell = name if name not in SHAPES else f"{name} on {tuple(SHAPES[name])}"
        name_cell += " (forward only)" if name in FORWARD_ONLY else ""
        rows.append(
            [
                name_cell,
                *cells,
                f"{timing.ratio('attnzoo', 'theirs'):.2f}",
                peaks["attnzoo"],
                peaks["theirs"],
                *rates,
            ]
        )
        print(" | ".join(rows[-1]), f"({time.time() - started:.0f} s)", file=sys.stderr)
    print(f"### Breadth I gates on {tuple(args.shape)}, {describe_machine()}\n")
    print(
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, float32 forward + backward, copy bandwidth "
        f"{bandwidth:.1f} GB/s; ratio = median of per-round ratios attnzoo / foreign.\n"
    )
    header = [
        "foreign module", "attnzoo ms", "foreign ms", "ratio", "attnzoo peak MiB", "foreign peak MiB",
        "attnzoo bytes (of copy bw)", "foreign bytes (of copy bw)",
    ]  # fmt: skip
    print(markdown_table(header, rows))
    print(f"\n(total {time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
