"""A lower bound for one benchmark step on this machine: its GEMMs at their own measured rate, plus
its unavoidable bytes at the measured copy bandwidth.

Small inner dimensions (an 8-wide ``QK^T``, a 1x1 convolution with 64 channels) run far below the
2048^3 GEMM rate, so a bound built from that rate would be out of reach. Instead, one step of the
plain reference algorithm is traced below autograd (forward and backward), every matrix product and
convolution it issues is recorded with its shapes and strides, and each distinct call is replayed
alone on fresh random data and timed: the bound's GEMM part is the sum of those times, the rate
this machine reaches for exactly those products. Softmax, normalisation and element-wise work are
left to the bytes part, which counts only what no algorithm can avoid: reading the input and the
weights, writing the output and (for training) reading the output's gradient and writing the
input's and the weights' gradients.

    PYTHONPATH=src python benchmarks/bound.py   # the bound of a small example, as a self-check
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
GEMM_OPS = {
    aten.mm.default,
    aten.bmm.default,
    aten.addmm.default,
    aten.baddbmm.default,
    aten.convolution.default,
    aten.convolution_backward.default,
}


@dataclass(frozen=True)
class _TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def make(self) -> torch.Tensor:
        # Random storage viewed with the recorded strides (expanded and transposed operands included).
        extent = 1 + sum((size - 1) * step for size, step in zip(self.shape, self.stride, strict=True))
        storage = torch.randn(extent if all(self.shape) else 0, dtype=self.dtype)
        return storage.as_strided(self.shape, self.stride)


def _spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _TensorSpec(tuple(value.shape), tuple(value.stride()), value.dtype)
    if isinstance(value, list | tuple):
        return tuple(_spec(v) for v in value)
    return value


class _GemmTrace(TorchDispatchMode):
    """Records every GEMM-like aten call (its arguments, tensors reduced to shape/stride/dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[tuple[Any, tuple[Any, ...]]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in GEMM_OPS:
            self.calls[(func, _spec(args))] += 1
            return func(*args, **kwargs)
        # Under inference_mode composite ops (conv2d, matmul, linear) arrive undecomposed: decompose
        # them here so their GEMMs are seen (as FlopCounterMode does).
        with self:
            out = func.decompose(*args, **kwargs)
        return func(*args, **kwargs) if out is NotImplemented else out


def _materialise(arg: Any) -> Any:
    if isinstance(arg, _TensorSpec):
        return arg.make()
    if isinstance(arg, tuple):
        return [_materialise(a) for a in arg]
    return arg


def _replay_seconds(func: Any, specs: tuple[Any, ...], repeats: int) -> float:
    args = [_materialise(a) for a in specs]
    with torch.no_grad():
        func(*args)  # warm up (allocation, oneDNN primitive creation)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            func(*args)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class Bound:
    """The bound of one step, in seconds: `gemm` + `bytes`."""

    gemm: float
    bytes: float
    gflop: float

    @property
    def seconds(self) -> float:
        return self.gemm + self.bytes


def gemm_seconds(step: Callable[[], object], *, repeats: int = 5) -> tuple[float, float]:
    """(seconds, GFLOP) of the GEMMs one call of `step` issues, each replayed alone at its own rate."""
    step()  # settle lazy initialisation outside the trace
    with _GemmTrace() as trace:
        step()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as flops:
        step()
    total = sum(count * _replay_seconds(func, specs, repeats) for (func, specs), count in trace.calls.items())
    return total, flops.get_total_flops() / 1e9


def min_bytes(module: torch.nn.Module, inputs: list[torch.Tensor], out_numel: int, *, training: bool) -> int:
    """Bytes no algorithm can avoid: inputs, weights and output once; for training also the output's
    gradient read and the input and weight gradients written."""
    in_bytes = sum(x.numel() * x.element_size() for x in inputs)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    out_bytes = out_numel * inputs[0].element_size()
    once = in_bytes + weight_bytes + out_bytes
    return 2 * once if training else once


def lower_bound(
    reference_step: Callable[[], object], nbytes: int, bandwidth_gbps: float, *, repeats: int = 5
) -> Bound:
    """The bound of a step whose plain reference algorithm is `reference_step`."""
    gemm, gflop = gemm_seconds(reference_step, repeats=repeats)
    return Bound(gemm=gemm, bytes=nbytes / (bandwidth_gbps * 1e9), gflop=gflop)


if __name__ == "__main__":
    from attnzoo.cli.harness import train_step

    argparse.ArgumentParser(description=__doc__).parse_args()  # no options: --help, or refuse others

    layer = torch.nn.Linear(1024, 1024)
    x = torch.randn(4096, 1024)
    step = train_step(layer, [x])
    bound = lower_bound(step, min_bytes(layer, [x], x.numel(), training=True), 20.0)
    print(f"Linear(1024) training step on {tuple(x.shape)}: {bound.gflop:.1f} GFLOP")
    print(
        f"bound {bound.seconds * 1e3:.1f} ms = GEMM {bound.gemm * 1e3:.1f} ms"
        f" + bytes {bound.bytes * 1e3:.1f} ms"
    )
