"""Which of two equally exact fast paths runs: a short calibration per shape class, or an override.

attnzoo has several places where a custom kernel and PyTorch's own ops compute the same exact
function at different speeds, and which one wins depends on the machine: kernel choices tuned on
an AVX-512 CPU picked the slower kernel on an AVX2 one (``shared/MEASURED.md``). The sites:

| site | candidates | static rule (validated on the AVX-512 benchmark machine) |
|---|---|---|
| ``global`` | ``blocked``, ``sdpa`` (padded flash) | ``sdpa`` |
| ``window`` | ``biased``, ``sdpa`` (``attend``) | ``biased`` |
| ``gate`` | ``fused``, ``plain`` (composite ops) | ``fused`` |
| ``select`` (SK, split attention) | ``fused``, ``plain`` (composite ops) | ``fused`` |
| ``spectral`` (GFNet's global filter) | ``dft`` (matrix products), ``fft`` | ``dft`` up to 14 a side |

`choose` decides in this order:

1. an override: the innermost `prefer` block for the site, else ``ATTNZOO_KERNEL_<SITE>``
   (``ATTNZOO_KERNEL_GLOBAL=blocked|sdpa|auto``, ``ATTNZOO_KERNEL_WINDOW=biased|sdpa|auto``,
   ``ATTNZOO_KERNEL_GATE=fused|plain|auto``, ``ATTNZOO_KERNEL_SELECT=fused|plain|auto``,
   ``ATTNZOO_KERNEL_SPECTRAL=dft|fft|auto``; the older
   ``ATTNZOO_GLOBAL_KERNEL`` still works); ``auto`` means no override;
2. the static rule, without measuring, when ``ATTNZOO_KERNEL_CALIBRATE=0``, when the inputs are
   small (under `SMALL` elements) or not on the CPU, under ``torch.compile``/``torch.export``/
   ``jit.trace``, functorch transforms or a ``TorchDispatchMode`` (``FlopCounterMode``), under
   autocast, under ``saved_tensors_hooks`` (non-reentrant ``torch.utils.checkpoint``: the
   recomputation must take the kernel the forward took), with
   ``torch.use_deterministic_algorithms(True)`` (every run then takes the same kernel, so results
   repeat bit for bit across runs), and inside another calibration;
3. otherwise the cached winner for the (site, shape class, thread count), measured the first time
   the class is seen in the process: the candidates run alternately on detached copies of the
   actual inputs, for at least two and at most `MAX_ROUNDS` rounds within a budget of about
   `BUDGET_S` seconds per candidate, and the one with the lowest time (its fastest round) wins; the
   static choice keeps its place unless another is more than `MARGIN` faster. The cost is paid
   once per shape class: for large inputs two runs of each candidate, about four extra training
   steps of the attention alone.

Every candidate is exact, so the choice changes speed only, never what is computed beyond
rounding. Calibration never touches the caller's autograd graph or module state: a training
shape class is timed as forward plus ``torch.autograd.grad`` on fresh leaves detached from the
inputs (`workload`), an inference one as forward under ``no_grad``; the gates time stand-in
small functions, so no module's parameters, batch-norm statistics or map capture are involved.
A lock serialises calibrations, so concurrent threads neither measure twice nor disturb each
other's measurements.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from attnzoo.kernels.route import composite_required

__all__ = ["SITES", "bucket", "choose", "chosen", "clear", "override", "prefer", "workload"]

# The candidates of each site, in the order the docs list them.
SITES: dict[str, tuple[str, ...]] = {
    "global": ("blocked", "sdpa"),
    "window": ("biased", "sdpa"),
    "gate": ("fused", "plain"),
    "select": ("fused", "plain"),
    "spectral": ("dft", "fft"),
}
_LEGACY_ENV = {"global": "ATTNZOO_GLOBAL_KERNEL"}
_ENV_CALIBRATE = "ATTNZOO_KERNEL_CALIBRATE"

# Inputs with fewer elements than this take the static rule: either kernel finishes in microseconds.
SMALL = 1 << 15
BUDGET_S = 0.01  # seconds per candidate a calibration aims to stay within (at least two rounds run)
MAX_ROUNDS = 7
MARGIN = 0.1  # another candidate must beat the static one by this fraction (single rounds scatter)

_cache: dict[tuple[object, ...], str] = {}
_lock = threading.RLock()
_local = threading.local()


def _reset_after_fork() -> None:
    global _lock
    _lock = threading.RLock()  # a lock held by another thread at fork time would never be released


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _allowed(site: str) -> tuple[str, ...]:
    if site not in SITES:
        raise ValueError(f"unknown kernel site {site!r}; expected one of {tuple(SITES)}")
    return ("auto", *SITES[site])


def override(site: str) -> str:
    """The override in force for ``site``: innermost `prefer`, else its environment variable,
    else ``"auto"`` (no override)."""
    allowed = _allowed(site)
    stack = getattr(_local, "stacks", {}).get(site)
    if stack:
        return str(stack[-1])
    for var in (f"ATTNZOO_KERNEL_{site.upper()}", _LEGACY_ENV.get(site)):
        if var is None or var not in os.environ:
            continue
        value = os.environ[var].strip().lower() or "auto"
        if value not in allowed:
            raise ValueError(f"{var} must be one of {allowed}, got {value!r}")
        if value != "auto" or var.startswith("ATTNZOO_KERNEL_"):
            return value
    return "auto"


@contextlib.contextmanager
def prefer(site: str, choice: str) -> Iterator[None]:
    """Force one kernel at ``site`` inside a ``with`` block (thread-local, nestable).

    Outside any block, ``ATTNZOO_KERNEL_<SITE>`` (e.g. ``ATTNZOO_KERNEL_GATE=plain``) does the same
    for the whole process; by default (``"auto"``) each site takes the kernel measured faster for
    the shape class (see `attnzoo.kernels.choose`).

    Args:
        site: ``"global"`` (SAGAN, non-local: ``"blocked"`` or ``"sdpa"``), ``"window"`` (Swin,
            temporal: ``"biased"`` or ``"sdpa"``), ``"gate"`` (SE, CBAM, the dual gate) or
            ``"select"`` (SK, split attention), the last two ``"fused"`` or ``"plain"``, or
            ``"spectral"`` (GFNet's global filter: ``"dft"`` matrix products or ``"fft"``).
        choice: One of the site's kernels, or ``"auto"`` (measure, or the static rule) to undo an
            outer override.

    Raises:
        ValueError: For an unknown site or kernel name (the message lists the allowed ones).

    Example:
        ```python
        >>> from attnzoo.kernels.choose import prefer
        >>> with prefer("gate", "plain"):
        ...     pass  # SE/CBAM gates run composite ops here
        ```
    """
    allowed = _allowed(site)
    if choice not in allowed:
        raise ValueError(f"prefer({site!r}, ...) expects one of {allowed}, got {choice!r}")
    stacks = getattr(_local, "stacks", None)
    if stacks is None:
        stacks = _local.stacks = {}
    stack = stacks.setdefault(site, [])
    stack.append(choice)
    try:
        yield
    finally:
        stack.pop()


def bucket(n: int) -> int:
    """The shape class of a size: the next power of two (so nearby shapes share one calibration)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def calibration_enabled() -> bool:
    """Whether ``ATTNZOO_KERNEL_CALIBRATE`` allows measuring (anything but 0/false/no/off)."""
    return os.environ.get(_ENV_CALIBRATE, "1").strip().lower() not in ("0", "false", "no", "off")


def _saved_tensor_hooks() -> bool:
    """Whether ``saved_tensors_hooks`` are active (non-reentrant checkpointing): a calibration's
    graph would be packed by them, and a cached choice could differ between the forward and its
    recomputation, which must save the same tensors."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _must_stay_static(elements: int, device: torch.device | str) -> bool:
    device_type = torch.device(device).type
    return bool(  # composite_required first: under torch.compile it is a constant and ends the test
        composite_required(dispatch=True)
        or not calibration_enabled()
        or device_type != "cpu"
        or elements < SMALL
        or getattr(_local, "calibrating", False)
        or _saved_tensor_hooks()
        or torch.is_autocast_enabled(device_type)
        or torch.are_deterministic_algorithms_enabled()
    )


def choose(
    site: str,
    key: tuple[object, ...],
    candidates: Mapping[str, Callable[[], object]],
    *,
    static: str,
    elements: int = SMALL,
    device: torch.device | str = "cpu",
) -> str:
    """The candidate to run at ``site`` for inputs of shape class ``key`` (see the module docstring).

    Args:
        site: One of `SITES`.
        key: The shape class (sizes through `bucket`, dtype, training or not).
        candidates: Each candidate's name and a function that runs it once on (copies of) the
            actual inputs, leaving no trace (build it with `workload`); called only when
            measuring.
        static: The validated static rule's choice, taken when no measuring is allowed.
        elements: Size of the inputs; below `SMALL` the static rule is taken.
        device: Where the inputs live; only CPU inputs are measured.

    Returns:
        A name from ``candidates``.
    """
    forced = override(site)
    if forced != "auto":
        return forced
    if static not in candidates:
        raise ValueError(f"choose({site!r}): static choice {static!r} is not among {tuple(candidates)}")
    if _must_stay_static(elements, device):
        return static
    full_key = (site, key, torch.get_num_threads())
    found = _cache.get(full_key)
    if found is not None:
        return found
    with _lock:
        found = _cache.get(full_key)
        if found is None:
            _local.calibrating = True
            try:
                found = _measure(candidates, static)
            finally:
                _local.calibrating = False
            _cache[full_key] = found
    return found


def _measure(candidates: Mapping[str, Callable[[], object]], static: str) -> str:
    """Time the candidates alternately (order reversed every round); the fastest wins.

    Two rounds always run (the first run of a candidate pays one-time costs: page faults of fresh
    buffers, thread-pool start-up), more while the total stays within ``BUDGET_S`` per candidate,
    at most `MAX_ROUNDS`. A candidate's time is its fastest round: on shared cores noise only ever
    adds time.
    """
    names = list(candidates)
    times: dict[str, list[float]] = {name: [] for name in names}
    budget = BUDGET_S * len(names)
    start = time.perf_counter()
    with torch.no_grad():
        for round_ in range(MAX_ROUNDS):
            for name in names if round_ % 2 == 0 else reversed(names):
                begin = time.perf_counter()
                candidates[name]()
                times[name].append(time.perf_counter() - begin)
            if round_ >= 1 and time.perf_counter() - start > budget:
                break
    cost = {name: min(t) for name, t in times.items()}
    best = min(names, key=cost.__getitem__)
    return best if cost[best] < (1.0 - MARGIN) * cost[static] else static


def chosen() -> dict[tuple[object, ...], str]:
    """The calibrated choices so far, ``{(site, key, threads): name}`` (a copy, for reports)."""
    with _lock:
        return dict(_cache)


def clear() -> None:
    """Forget every calibrated choice (the next call of each shape class measures again)."""
    with _lock:
        _cache.clear()


def workload(
    fn: Callable[..., object], tensors: Sequence[Tensor | None], train: Sequence[bool] | bool
) -> Callable[[], object]:
    """A candidate for `choose`: ``fn`` on detached copies of ``tensors`` that leaves no trace.

    Args:
        fn: Runs the candidate on the given tensors and returns its output.
        tensors: The actual inputs (None passes through).
        train: Which inputs want gradients (or one flag for all): if any, the candidate runs forward
            and ``torch.autograd.grad`` on fresh leaves (the caller's graph and ``.grad`` fields are
            untouched); otherwise forward only, under ``no_grad``.

    The output gradient is a dense tensor of ones laid out like the output, made once. The gradient
    of ``out.sum()`` is an expanded (stride 0) tensor, which a training step never passes and which
    matrix products take slowly: with it GFNet's DFT products timed 11-12 ms a step against the FFT's
    9-10, and the calibration picked the FFT; with a dense gradient they take 4.5-5 ms against 6.2-6.6
    (`(8, 14, 14, 384)`, 2 threads, AVX-512), and in the module's real step the FFT ran 1.03 of
    fightingcv's time where the DFT runs 0.89-0.94.
    """
    flags = [bool(train)] * len(tensors) if isinstance(train, bool) else [bool(f) for f in train]
    grad_out: list[Tensor] = []  # made at the first run, reused by the others

    def run() -> object:
        leaves = [
            None if t is None else t.detach().requires_grad_(flag and t.is_floating_point())
            for t, flag in zip(tensors, flags, strict=True)
        ]
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        if not wanted:
            with torch.no_grad():
                return fn(*leaves)
        with torch.enable_grad():
            out = fn(*leaves)
            if not isinstance(out, Tensor):
                raise TypeError(f"workload: the candidate returned {type(out).__name__}, expected a Tensor")
            if not grad_out or grad_out[0].shape != out.shape:
                grad_out[:] = [torch.ones_like(out)]
            return torch.autograd.grad(out, wanted, grad_out[0], allow_unused=True)

    return run
