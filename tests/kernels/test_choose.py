"""Kernel choice (`attnzoo.kernels.choose`): made once per site and shape class, cached, overridable,
static where measuring is not allowed, and without side effects. Which kernel is faster is the
benchmarks' business: a fake clock decides here, never a real timing."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.utils.checkpoint
from torch.utils.flop_counter import FlopCounterMode

import attnzoo
from attnzoo.kernels import choose
from attnzoo.kernels.biased import biased_attention
from attnzoo.kernels.blocked import global_attention
from attnzoo.kernels.gate import GatePlan, fused_gate


@pytest.fixture(autouse=True)
def _calibrating(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # tests/conftest.py switches calibration off for the rest of the suite (deterministic paths)
    monkeypatch.setenv("ATTNZOO_KERNEL_CALIBRATE", "1")
    for site in choose.SITES:
        monkeypatch.delenv(f"ATTNZOO_KERNEL_{site.upper()}", raising=False)
    monkeypatch.delenv("ATTNZOO_GLOBAL_KERNEL", raising=False)
    choose.clear()
    yield
    choose.clear()


class FakeClock:
    """``time.perf_counter`` for `choose`: each candidate advances it by its own fixed cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fakes(clock: FakeClock, costs: dict[str, float]) -> tuple[dict[str, Callable[[], None]], Counter]:
    calls: Counter = Counter()

    def make(name: str) -> Callable[[], None]:
        def run() -> None:
            calls[name] += 1
            clock.now += costs[name]

        return run

    return {name: make(name) for name in costs}, calls


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(choose.time, "perf_counter", fake)
    return fake


def test_choice_is_measured_once_per_site_and_shape_class(clock: FakeClock) -> None:
    candidates, calls = fakes(clock, {"fused": 1e-3, "plain": 5e-4})
    assert choose.choose("gate", ("a",), candidates, static="fused") == "plain"
    first = dict(calls)
    assert first["fused"] == first["plain"] >= 2  # alternating rounds, at least two
    assert first["fused"] <= choose.MAX_ROUNDS
    for _ in range(3):  # cached: no candidate runs again
        assert choose.choose("gate", ("a",), candidates, static="fused") == "plain"
    assert dict(calls) == first
    assert choose.chosen() == {("gate", ("a",), torch.get_num_threads()): "plain"}
    # another shape class, or the same key at another site, measures again
    choose.choose("gate", ("b",), candidates, static="fused")
    choose.choose("select", ("a",), candidates, static="fused")
    assert calls["plain"] == 3 * first["plain"]


def test_expensive_candidates_run_twice(clock: FakeClock) -> None:
    candidates, calls = fakes(clock, {"blocked": 8.0, "sdpa": 2.0})
    assert choose.choose("global", ("a",), candidates, static="blocked") == "sdpa"
    assert calls == {"blocked": 2, "sdpa": 2}


def test_static_choice_keeps_its_place_within_the_margin(clock: FakeClock) -> None:
    candidates, _ = fakes(clock, {"biased": 1.0, "sdpa": 1.0 - choose.MARGIN / 2})
    assert choose.choose("window", ("k",), candidates, static="biased") == "biased"
    candidates, _ = fakes(clock, {"biased": 1.0, "sdpa": 1.0 - 2 * choose.MARGIN})
    assert choose.choose("window", ("k2",), candidates, static="biased") == "sdpa"


def test_bucket_gives_powers_of_two() -> None:
    assert [choose.bucket(n) for n in (0, 1, 2, 3, 33, 64, 65)] == [1, 1, 2, 4, 64, 64, 128]


def test_overrides_win(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    candidates, calls = fakes(clock, {"fused": 1.0, "plain": 0.5})
    with choose.prefer("gate", "fused"):
        assert choose.choose("gate", ("a",), candidates, static="plain") == "fused"
        with choose.prefer("gate", "auto"):  # calibration again inside an outer override
            assert choose.choose("gate", ("a",), candidates, static="fused") == "plain"
    monkeypatch.setenv("ATTNZOO_KERNEL_GATE", "fused")
    assert choose.choose("gate", ("a",), candidates, static="fused") == "fused"  # beats the cache
    with choose.prefer("gate", "plain"):  # the context manager beats the environment
        assert choose.choose("gate", ("a",), candidates, static="fused") == "plain"
    monkeypatch.setenv("ATTNZOO_KERNEL_GATE", "auto")
    assert choose.choose("gate", ("a",), candidates, static="fused") == "plain"
    assert calls["fused"] <= choose.MAX_ROUNDS  # measured once, for the "auto" block


def test_calibration_off_takes_the_static_rule(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    candidates, calls = fakes(clock, {"blocked": 1.0, "sdpa": 0.1})
    monkeypatch.setenv("ATTNZOO_KERNEL_CALIBRATE", "0")
    assert choose.choose("global", ("a",), candidates, static="blocked") == "blocked"
    # small inputs and other devices are not measured either
    monkeypatch.setenv("ATTNZOO_KERNEL_CALIBRATE", "1")
    small = choose.SMALL - 1
    assert choose.choose("global", ("a",), candidates, static="blocked", elements=small) == "blocked"
    assert choose.choose("global", ("a",), candidates, static="blocked", device="meta") == "blocked"
    torch.use_deterministic_algorithms(True)
    try:
        assert choose.choose("global", ("a",), candidates, static="blocked") == "blocked"
    finally:
        torch.use_deterministic_algorithms(False)
    assert not calls and not choose.chosen()


def test_training_workload_passes_a_dense_output_gradient_and_leaves_no_trace() -> None:
    """A training step passes a dense output gradient; out.sum()'s is expanded (stride 0), which
    matrix products take several times slower, and it biased the calibration (GFNet's DFT)."""
    seen: list[torch.Tensor] = []

    def candidate(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = (t @ w).transpose(0, 1)
        out.register_hook(seen.append)
        return out

    x, w = torch.randn(6, 5, requires_grad=True), torch.randn(5, 4)
    run = choose.workload(candidate, (x, w), [True, False])
    for _ in range(2):
        (grad_x,) = run()  # type: ignore[misc]  # the wanted inputs' gradients
    assert len(seen) == 2 and seen[0] is seen[1]  # made once
    assert 0 not in seen[0].stride() and seen[0].shape == (4, 6) and bool((seen[0] == 1).all())
    torch.testing.assert_close(grad_x, torch.ones(6, 4) @ w.T)
    assert x.grad is None


def test_unknown_names_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"expects one of \('auto', 'fused', 'plain'\), got 'fast'"):
        with choose.prefer("gate", "fast"):
            pass
    with pytest.raises(ValueError, match=r"unknown kernel site 'gates'.*'global', 'window', 'gate'"):
        choose.override("gates")
    monkeypatch.setenv("ATTNZOO_KERNEL_WINDOW", "flash")
    allowed = r"must be one of \('auto', 'biased', 'sdpa'\)"
    with pytest.raises(ValueError, match=f"ATTNZOO_KERNEL_WINDOW {allowed}"):
        choose.override("window")
    monkeypatch.setenv("ATTNZOO_KERNEL_GLOBAL", "pad")
    allowed = r"must be one of \('auto', 'blocked', 'sdpa'\)"
    with pytest.raises(ValueError, match=f"ATTNZOO_KERNEL_GLOBAL {allowed}"):
        attnzoo.kernels.blocked.kernel_choice()


def test_no_calibration_under_torch_tools(clock: FakeClock) -> None:
    candidates, calls = fakes(clock, {"fused": 1.0, "plain": 0.5})

    def pick(x: torch.Tensor) -> torch.Tensor:
        name = choose.choose("gate", ("a",), candidates, static="fused")
        return x * (2.0 if name == "fused" else 3.0)

    x = torch.ones(3)
    with FlopCounterMode(display=False):
        assert torch.equal(pick(x), 2 * x)
    assert torch.equal(torch.func.vmap(pick)(x), 2 * x)
    assert torch.equal(torch.func.grad(lambda t: pick(t).sum())(x), 2 * x)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(pick, backend="eager", fullgraph=True)(x), 2 * x)
    assert not calls and not choose.chosen()


def test_checkpointing_takes_the_static_rule() -> None:
    # non-reentrant checkpointing packs every saved tensor: no calibration graph may pass through it,
    # and the recomputation must take the forward's kernel
    module = attnzoo.create("cbam", 32)
    x = torch.randn(2, 32, 32, 32, requires_grad=True)
    out = torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)
    out.sum().backward()
    assert x.grad is not None and not choose.chosen()
    x.grad = None
    module(x).sum().backward()  # outside: measured
    assert [key[0] for key in choose.chosen()] == ["gate"]
    torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False).sum().backward()


def test_concurrent_threads_measure_once(clock: FakeClock) -> None:
    lock = threading.Lock()
    calls: Counter = Counter()

    def make(name: str, cost: float) -> Callable[[], None]:
        def run() -> None:
            with lock:
                calls[name] += 1
                clock.now += cost

        return run

    candidates = {"fused": make("fused", 1.0), "plain": make("plain", 0.5)}
    results: list[str] = []

    def pick() -> None:
        results.append(choose.choose("gate", ("t",), candidates, static="fused"))

    threads = [threading.Thread(target=pick) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["plain"] * 4
    assert calls == {"fused": 2, "plain": 2}  # two (expensive) rounds, by one thread


# The sites: each override takes its kernel (seen in the autograd graph), and with calibration on
# the choice is recorded and the output is the forced kernels' output.


def _names(out: torch.Tensor, depth: int = 3) -> str:
    """The autograd node names within ``depth`` steps of ``out`` (views wrap the kernels' nodes)."""
    names, layer = [], [out.grad_fn]
    for _ in range(depth):
        names += [type(node).__name__ for node in layer]
        layer = [nxt for node in layer for nxt, _ in node.next_functions if nxt is not None]
    return " ".join(names)


def test_global_site() -> None:
    q, k = torch.randn(1, 1024, 8, requires_grad=True), torch.randn(1, 1024, 8, requires_grad=True)
    v = torch.randn(1, 1024, 64, requires_grad=True)
    with attnzoo.global_kernel("blocked"):
        blocked = global_attention(q, k, v, scale=1.0)
    with choose.prefer("global", "sdpa"):
        padded = global_attention(q, k, v, scale=1.0)
    assert "Blocked" in _names(blocked) and "Blocked" not in _names(padded)
    auto = global_attention(q, k, v, scale=1.0)
    (site, key, _), name = next(iter(choose.chosen().items()))
    assert site == "global" and key[-1] is True and name in ("blocked", "sdpa")
    torch.testing.assert_close(auto, blocked if name == "blocked" else padded)
    assert q.grad is None and v.grad is None  # calibration took no gradient into the inputs


def test_window_site_draws_no_random_numbers() -> None:
    qkv = torch.randn(16, 49, 3, 4, 16, requires_grad=True)
    bias = torch.randn(4, 49, 49, requires_grad=True)
    with choose.prefer("window", "sdpa"):
        plain = biased_attention(qkv, bias, scale=0.25)
    assert "Biased" not in _names(plain)
    state = torch.get_rng_state()
    auto = biased_attention(qkv, bias, scale=0.25)
    assert torch.equal(torch.get_rng_state(), state)
    assert [key[0] for key in choose.chosen()] == ["window"]
    torch.testing.assert_close(auto, plain)


@pytest.mark.parametrize("site", ["gate", "select"])
def test_gate_sites_leave_module_state_alone(site: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # SK's attention function has a BatchNorm1d, SE's may have one: calibration must not run them.
    def step(calibrate: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        monkeypatch.setenv("ATTNZOO_KERNEL_CALIBRATE", calibrate)
        torch.manual_seed(1)
        module = attnzoo.create("sk" if site == "select" else "cbam", 32, dtype=torch.float64).train()
        x = torch.randn(2, 32, 32, 32, dtype=torch.float64, requires_grad=True)
        module(x).sum().backward()
        return [b.clone() for b in module.buffers()], [p.grad for p in module.parameters()]

    buffers_off, grads_off = step("0")
    buffers_on, grads_on = step("1")
    assert [key[0] for key in choose.chosen()] == [site]
    for a, b in zip(buffers_off, buffers_on, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(grads_off, grads_on, strict=True):  # the kernels differ in rounding only
        torch.testing.assert_close(a, b)


def test_gate_override_takes_the_plain_ops() -> None:
    plan = GatePlan(channel_fn=torch.sigmoid, channel_stats=("mean",))
    x = torch.randn(2, 32, 32, 32, requires_grad=True)
    with choose.prefer("gate", "plain"):
        plain = fused_gate(x, plan)
    with choose.prefer("gate", "fused"):
        fused = fused_gate(x, plan)
    assert "GateFn" in _names(fused) and "GateFn" not in _names(plain)
    torch.testing.assert_close(plain, fused)
