"""More of the hostile user's sweep, over every registered mechanism and every compat class (as
`tests/test_adversarial.py`, whose cases and helpers it shares): what the other registry-wide suites
do not try.

- an empty batch: an empty output whose backward runs, or a `ValueError` naming the empty input;
- `torch.func`: `vmap` over a stack of batches (masks batched too) equals a loop; per-sample gradients
  (`vmap(grad(...))`) equal one backward per sample; `functional_call` with fast weights (MAML's
  ``p - lr * g``) and `create_graph=True` gives the gradients and second derivatives of a module that
  holds those values;
- backward takes an expanded, strided or channels_last gradient of the output, leaves it as it was, and
  runs twice with `retain_graph`; `torch.utils.checkpoint` gives the plain gradients;
- `deepcopy`, `pickle`, `state_dict` into a fresh module (`strict=True`) and `.double()` after
  construction give the same outputs; `inference_mode` equals `no_grad`; a seeded training forward
  repeats; frozen parameters or inputs without grad give the gradients of the others unchanged;
- the compat classes under CPU autocast and forward-mode AD (the registered ones are in the compat
  matrix), and every 4-D/5-D input and module in channels_last (the matrix covers 4-D registered
  mechanisms only).

Values are compared in float64, against the same module's plain call. A mechanism joins by being
registered, a compat class by its example.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from tests.test_adversarial import CASES, IDS, Case, accepted_mask, build, first, inputs, mask_names
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint

import attnzoo

F64 = torch.float64
EXACT = {"atol": 1e-9, "rtol": 1e-9}
MASKED = [c for c in CASES if mask_names(c)]


def build64(case: Case, seed: int = 0) -> torch.nn.Module:
    """The example's module in float64 (built in float32 from `seed`, then converted)."""
    torch.manual_seed(seed)
    return case.cls(**case.example.kwargs).double()


def noise(shape, seed: int = 9) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def batched(case: Case, batch: int, dtype: torch.dtype = F64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(batch, *s[1:], generator=gen, dtype=dtype) for s in case.example.inputs]


def grads(module: torch.nn.Module, xs, grad_out=None, seed: int = 3):
    """Output and the gradients of every input and parameter for the output gradient `grad_out(out)`
    (a fixed random one by default); a missing gradient is None."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout draws every call
    out = first(module(*xs))
    out.backward(noise(out.shape) if grad_out is None else grad_out(out))
    return out.detach(), [x.grad for x in xs], [p.grad for p in module.parameters()]


def assert_same_grads(got, want, what: str) -> None:
    torch.testing.assert_close(got[0], want[0], **EXACT, msg=f"{what}: output")
    for kind, a_list, b_list in (("input", got[1], want[1]), ("parameter", got[2], want[2])):
        for i, (a, b) in enumerate(zip(a_list, b_list, strict=True)):
            assert (a is None) == (b is None), f"{what}: {kind} {i} has a gradient in one run only"
            if a is not None:
                torch.testing.assert_close(a, b, **EXACT, msg=f"{what}: {kind} {i} gradient")


# ---------------------------------------------------------------------------------------------
# Empty batches


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_empty_batch_gives_an_empty_output_or_names_the_input(case, train):
    """Never a raw torch error from a reshape of 0 elements, a division by the batch or a max() of
    nothing: either (0, ...) outputs with a backward that runs, or the module's own ValueError."""
    module = build64(case).train(train)
    xs = [x.requires_grad_() for x in batched(case, 0)]
    try:
        out = first(module(*xs))
    except ValueError as err:
        assert "empty" in str(err) or "batch" in str(err), f"{case.id}: {err}"
        return
    assert tuple(out.shape) == (0, *case.example.output[1:]), case.id
    out.sum().backward()


# ---------------------------------------------------------------------------------------------
# torch.func


def _functional(module: torch.nn.Module):
    params = {n: p.detach() for n, p in module.named_parameters()}
    return lambda *xs, **kw: first(functional_call(module, (params, dict(module.named_buffers())), xs, kw))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vmap_over_a_stack_of_batches_equals_a_loop(case):
    """`vmap` reads no value into Python control flow (a shortcut for masks that block nothing asked
    `bool(dead.any())`) and writes into no preallocated `out=` buffer."""
    module = build64(case).eval()
    stacked = [torch.stack([x, 0.5 * x.flip(0)]) for x in inputs(case, F64)]
    out = vmap(_functional(module))(*stacked)
    with torch.no_grad():
        want = torch.stack([first(module(*[s[i] for s in stacked])) for i in range(2)])
    torch.testing.assert_close(out, want, **EXACT, msg=case.id)


@pytest.mark.parametrize("case", MASKED, ids=lambda c: c.id)
def test_vmap_over_batched_masks_equals_a_loop(case):
    """Each stacked batch with its own mask, bool and float, one query row fully masked in one of them."""
    module = build(case).eval()  # float32: `accepted_mask` probes with float32 inputs
    xs = inputs(case)
    call = _functional(module)
    for name in mask_names(case):
        shape, taken = accepted_mask(module, case, name)
        keep = torch.rand(shape, generator=torch.Generator().manual_seed(2)) > 0.3
        keep[..., 0] = True
        dead = keep.clone()
        if dead.ndim >= 2:
            dead[..., 0, :] = False
        for dtype in sorted(taken, key=str):
            masks = torch.stack([keep, dead])
            if dtype != torch.bool:
                masks = torch.zeros(masks.shape).masked_fill(~masks, float("-inf"))
            stacked = [torch.stack([x, 0.5 * x]) for x in xs]
            out = vmap(lambda *a: call(*a[:-1], **{name: a[-1]}))(*stacked, masks)  # noqa: B023
            with torch.no_grad():
                want = torch.stack([first(module(*[s[i] for s in stacked], **{name: masks[i]}))
                                    for i in range(2)])
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, msg=f"{case.id}: {name} {dtype}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_per_sample_gradients_by_vmap_of_grad(case):
    module = build64(case).eval()
    params = {n: p.detach() for n, p in module.named_parameters()}
    if not params:
        pytest.skip("no parameters: no per-sample parameter gradients")
    buffers = dict(module.named_buffers())

    def loss(p, *x):
        return first(functional_call(module, (p, buffers), tuple(t.unsqueeze(0) for t in x))).square().sum()

    xs = inputs(case, F64)
    per_sample = vmap(grad(loss), in_dims=(None, *[0] * len(xs)))(params, *xs)
    for i in range(xs[0].shape[0]):
        module.zero_grad(set_to_none=True)
        first(module(*[x[i : i + 1] for x in xs])).square().sum().backward()
        for n, p in module.named_parameters():
            want = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(per_sample[n][i], want, **EXACT, msg=f"{case.id}: sample {i}, {n}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_create_graph_through_functional_call_with_fast_weights(case):
    """MAML's inner step: the module runs on fast weights ``p - lr`` by `functional_call`, the gradient
    keeps its graph and is differentiated again. The gates and SK's selection recompute the module's
    small function in that backward, after the swap was undone: their first-order gradients came back
    None, or the recompute refused (`stale_closure`)."""
    module = build64(case).eval()
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    if not names:
        pytest.skip("no parameters: no fast weights")
    xs = inputs(case, F64)
    base = [module.get_parameter(n).detach().clone().requires_grad_() for n in names]
    fast = dict(zip(names, [b - 0.01 for b in base], strict=True))  # non-leaf, as after an inner step
    weight = noise(case.example.output)

    def second_order(out, wrt, leaves):
        inner = torch.autograd.grad((out * weight).sum(), wrt, create_graph=True, allow_unused=True)
        inner = [torch.zeros_like(t) if g is None else g for g, t in zip(inner, wrt, strict=True)]
        outer = sum(g.square().sum() for g in inner)
        if not outer.requires_grad:  # the output is linear in every parameter (a residual's gamma)
            return inner, [torch.zeros_like(t) for t in leaves]
        found = torch.autograd.grad(outer, leaves, allow_unused=True)
        return inner, [torch.zeros_like(t) if g is None else g for g, t in zip(found, leaves, strict=True)]

    got = second_order(first(functional_call(module, fast, tuple(xs))), list(fast.values()), base)
    holder = copy.deepcopy(module)
    with torch.no_grad():
        for n, t in fast.items():
            holder.get_parameter(n).copy_(t)
    leaves = [holder.get_parameter(n) for n in names]
    want = second_order(first(holder(*xs)), leaves, leaves)
    for kind, a_list, b_list in (("gradient", got[0], want[0]), ("second derivative", got[1], want[1])):
        for n, a, b in zip(names, a_list, b_list, strict=True):
            msg = f"{case.id}: {kind} of {n}"
            torch.testing.assert_close(a.detach(), b.detach(), atol=1e-8, rtol=1e-8, msg=msg)


# ---------------------------------------------------------------------------------------------
# Backward


def _layouts(out: torch.Tensor) -> dict[str, tuple]:
    """Output gradients in odd layouts, each with a contiguous twin of the same values."""
    g = noise(out.shape)
    wide = torch.zeros(*out.shape[:-1], 2 * out.shape[-1], dtype=F64)
    wide[..., ::2] = g
    found = {
        "expanded": (torch.ones((), dtype=F64).expand(out.shape), torch.ones(out.shape, dtype=F64)),
        "strided": (wide[..., ::2], g),
        "batch_expanded": (g[:1].expand(out.shape), g[:1].expand(out.shape).contiguous()),
    }
    if out.ndim == 4:
        found["channels_last"] = (g.contiguous(memory_format=torch.channels_last), g)
    return found


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_backward_takes_any_layout_of_the_output_gradient(case, train):
    """A custom kernel's backward sees the output gradient as autograd hands it over: expanded
    (`out.sum()`), strided or channels_last. It must not view it as contiguous, nor write into it."""
    module = build64(case).train(train)
    xs = inputs(case, F64)
    with torch.no_grad():
        shape = first(module(*xs)).shape
    for kind, (odd, plain) in _layouts(torch.empty(shape)).items():
        got = grads(module, xs, lambda _: odd)  # noqa: B023
        assert_same_grads(got, grads(module, xs, lambda _: plain), f"{case.id}: {kind} output gradient")  # noqa: B023
    xs = [x.requires_grad_() for x in xs]
    torch.manual_seed(3)
    out = first(module(*xs))
    g = noise(out.shape)
    kept = g.clone()
    out.backward(g, retain_graph=True)
    assert torch.equal(g, kept), f"{case.id}: backward wrote into the output gradient"
    once = [x.grad.clone() for x in xs]
    out.backward(g)  # a second backward through the retained graph adds the same gradients again
    for x, first_grad in zip(xs, once, strict=True):
        torch.testing.assert_close(x.grad, 2 * first_grad, **EXACT, msg=f"{case.id}: retain_graph")


class _Checkpointed(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return checkpoint(lambda *a: first(self.inner(*a)), *xs, use_reentrant=False)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_activation_checkpointing_gives_the_plain_gradients(case):
    """Training mode: the recompute in backward draws the same dropout masks and saves the same
    tensors (a kernel choice that changed between forward and recompute would fail here)."""
    module = build64(case).train()
    state = copy.deepcopy(module.state_dict())  # BatchNorm statistics move with every training forward
    want = grads(module, inputs(case, F64))
    module.load_state_dict(state)
    assert_same_grads(grads(_Checkpointed(module), inputs(case, F64)), want, f"{case.id}: checkpoint")


# ---------------------------------------------------------------------------------------------
# Copies, modes, frozen parameters


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_copies_and_state_dict_give_the_same_outputs(case):
    module = build64(case).train()
    first(module(*inputs(case, F64)))  # a training step first: statistics and caches filled
    module.eval()
    xs = inputs(case, F64)
    with torch.no_grad():
        want = first(module(*xs))
        buffer = io.BytesIO()
        torch.save(module.state_dict(), buffer)
        buffer.seek(0)
        fresh = build64(case, seed=123)
        fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
        copies = {"deepcopy": copy.deepcopy(module), "pickle": pickle.loads(pickle.dumps(module)),
                  "state_dict": fresh}
        for kind, other in copies.items():
            out = first(other.eval()(*xs))
            torch.testing.assert_close(out, want, atol=0, rtol=0, msg=f"{case.id}: {kind}")
        doubled = build(case).double().eval()  # built in float32, converted after construction
        torch.testing.assert_close(first(doubled(*xs)), first(build64(case).eval()(*xs)), atol=0, rtol=0,
                                   msg=f"{case.id}: .double()")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inference_mode_equals_no_grad_and_seeded_training_repeats(case):
    module = build64(case).eval()
    xs = inputs(case, F64)
    with torch.no_grad():
        want = first(module(*xs))
    with torch.inference_mode():
        out = first(module(*xs))
    torch.testing.assert_close(out, want, atol=0, rtol=0, msg=f"{case.id}: inference_mode")
    module.train()
    with torch.inference_mode():
        first(module(*xs))  # whatever a module caches here must not break the training step below
    xs = [x.requires_grad_() for x in xs]
    torch.manual_seed(5)
    a = first(module(*xs))
    a.sum().backward()
    torch.manual_seed(5)
    b = first(module(*xs))
    torch.testing.assert_close(a, b, atol=0, rtol=0, msg=f"{case.id}: seeded training forward")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_frozen_parameters_or_inputs_without_grad_change_no_other_gradient(case):
    module = build64(case).train()
    xs = inputs(case, F64)
    _, input_grads, param_grads = grads(module, xs)
    module.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    out = first(module(*xs))  # inputs without grad: the parameters' gradients alone
    if out.requires_grad:
        out.backward(noise(out.shape))
        for p, want in zip(module.parameters(), param_grads, strict=True):
            assert (p.grad is None) == (want is None), case.id
            if want is not None:
                torch.testing.assert_close(p.grad, want, **EXACT, msg=f"{case.id}: parameter gradient")
    module.requires_grad_(False)
    got = grads(module, xs)
    assert all(p.grad is None for p in module.parameters()), case.id
    for i, (a, b) in enumerate(zip(got[1], input_grads, strict=True)):
        torch.testing.assert_close(a, b, **EXACT, msg=f"{case.id}: input {i} with frozen parameters")
    torch.manual_seed(3)
    assert not first(module(*xs)).requires_grad, f"{case.id}: output requires grad with nothing that does"


# ---------------------------------------------------------------------------------------------
# Autocast, forward-mode AD and channels_last where the compat matrix does not look

COMPAT = [c for c in CASES if c.id.startswith("compat.")]


@pytest.mark.parametrize("case", COMPAT, ids=lambda c: c.id)
def test_compat_class_under_cpu_autocast_is_close_to_float32(case):
    module = build(case).eval()
    xs = [x.requires_grad_() for x in inputs(case)]
    with torch.no_grad():
        want = first(module(*xs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = first(module(*xs))
    assert out.dtype in (torch.float32, torch.bfloat16) and torch.isfinite(out).all(), case.id
    rel = (out.float() - want).norm() / want.norm().clamp_min(1e-6)
    assert rel < 5e-2, f"{case.id}: relative error {rel:.3g} under autocast"
    out.float().square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in xs if x.grad is not None), case.id


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_nested_torch_func_grad_equals_autograd_double_backward(case):
    """grad of grad (a Hessian-vector product by torch.func), and autograd over an inner torch.func.grad
    (MAML's pattern): SDPA's fused CPU kernels have no differentiable backward, so the attention takes
    its decomposition under a grad transform."""
    module = build64(case).eval()
    xs = inputs(case, F64)
    v = noise(xs[0].shape)
    loss = lambda t: first(module(t, *xs[1:])).square().sum()  # noqa: E731
    got = grad(lambda t: (grad(loss)(t) * v).sum())(xs[0])
    x0 = xs[0].clone().requires_grad_()
    (g,) = torch.autograd.grad(loss(x0), x0, create_graph=True)
    (want,) = torch.autograd.grad((g * v).sum(), x0)
    torch.testing.assert_close(got, want, **EXACT, msg=f"{case.id}: grad of grad")
    x1 = xs[0].clone().requires_grad_()
    (mixed,) = torch.autograd.grad((grad(loss)(x1) * v).sum(), x1)
    torch.testing.assert_close(mixed, want, **EXACT, msg=f"{case.id}: autograd over torch.func.grad")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float64_module_keeps_float64_under_cpu_autocast(case):
    """torch's autocast leaves float64 tensors alone (not "eligible"): a float64 model computes as
    without it, where attnzoo once cast its attention to bfloat16 (raw dtype errors in the next
    projection, bfloat16 outputs or bfloat16-precision numbers)."""
    module = build64(case).eval()
    xs = inputs(case, F64)
    want = first(module(*xs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = first(module(*xs))
    assert out.dtype == F64, f"{case.id}: {out.dtype} under autocast"
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12, msg=f"{case.id}: under autocast")


@pytest.mark.parametrize("case", COMPAT, ids=lambda c: c.id)
def test_compat_class_forward_mode_ad_equals_reverse_mode_twice(case):
    module = build64(case).eval()
    xs = [x.to(F64) if x.is_floating_point() else x for x in inputs(case)]
    tangent = noise(xs[0].shape)
    run = lambda x0: first(module(x0, *xs[1:]))  # noqa: E731
    _, by_func = torch.func.jvp(run, (xs[0],), (tangent,))
    x0 = xs[0].clone().requires_grad_()
    out = run(x0)
    probe = torch.zeros_like(out, requires_grad=True)  # J t = d/du <J^T u, t>
    (vjp,) = torch.autograd.grad(out, x0, probe, create_graph=True)
    (expected,) = torch.autograd.grad((vjp * tangent).sum(), probe)
    # a class whose original computes in float32 whatever the input (timm's LiteMLA) agrees to float32
    tolerance = {"atol": 1e-5, "rtol": 1e-4} if getattr(case.cls, "float32_math", False) else EXACT
    torch.testing.assert_close(by_func, expected, **tolerance)


@pytest.mark.parametrize("case", COMPAT, ids=lambda c: c.id)
def test_compat_class_is_one_fx_node_of_a_traced_model_and_refuses_torchscript_by_name(case):
    from tests.test_compat_matrix import check_fx

    module = build(case).eval()
    check_fx(module, inputs(case))
    with pytest.raises(TypeError, match="torch.jit.script cannot compile attnzoo's"):
        torch.jit.script(module)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_mode_ad_with_frozen_parameters_or_under_no_grad(case):
    """Dual tensors through a frozen module, and under no_grad, give the tangent of a trainable one
    (the kernels' no-grad shortcuts write with out=, which forward AD cannot differentiate)."""
    import torch.autograd.forward_ad as fwAD

    module = build64(case).eval()
    xs = [x.to(F64) if x.is_floating_point() else x for x in inputs(case)]
    tangent = noise(xs[0].shape)
    _, expected = torch.func.jvp(lambda x0: first(module(x0, *xs[1:])), (xs[0],), (tangent,))
    module.requires_grad_(False)
    for context in (torch.enable_grad, torch.no_grad):
        with context(), fwAD.dual_level():
            out = first(module(fwAD.make_dual(xs[0], tangent), *xs[1:]))
            got = fwAD.unpack_dual(out).tangent
        torch.testing.assert_close(got, expected, **EXACT)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", COMPAT, ids=lambda c: c.id)
def test_compat_class_create_graph_gives_the_plain_first_order_gradient(case, train):
    """With `create_graph=True` the kernels recompute their plain twins; the gradient must be the same
    (gradgradcheck would pass a consistently wrong one)."""
    module = build64(case).train(train)
    xs = [x.to(F64) if x.is_floating_point() else x for x in inputs(case)]
    x0 = xs[0].clone().requires_grad_()
    found = []
    for create_graph in (True, False):
        torch.manual_seed(0)  # the same dropout draws
        out = first(module(x0, *xs[1:]))
        found.append(torch.autograd.grad(out.square().sum(), x0, create_graph=create_graph)[0])
    torch.testing.assert_close(found[0], found[1], **EXACT)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    if x.ndim not in (4, 5):
        return x
    return x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)


@pytest.mark.parametrize("case", [c for c in CASES if any(len(s) in (4, 5) for s in c.example.inputs)],
                         ids=lambda c: c.id)
def test_channels_last_inputs_and_module_give_the_contiguous_gradients(case):
    module = build64(case).eval()
    xs = inputs(case, F64)
    want = grads(module, xs)
    converted = copy.deepcopy(module)
    for sub in converted.modules():  # every 4-D/5-D weight, as `.to(memory_format=...)` does for 4-D
        for p in sub.parameters(recurse=False):
            p.data = _channels_last(p.data)
    got = grads(converted, [_channels_last(x) for x in xs])
    assert_same_grads(got, want, f"{case.id}: channels_last")


def test_attend_under_vmap_with_a_float_bias_that_masks_nothing():
    """The smallest case of the vmap failure: a float bias (relative positions) whose rows are all
    finite, so `_merge_masks` looked for fully masked rows with `bool(dead.any())`."""
    q, k, v = (torch.randn(3, 2, 1, 4, 5, dtype=F64) for _ in range(3))
    bias = torch.randn(3, 1, 1, 4, 4, dtype=F64)
    out = vmap(lambda *t: attnzoo.functional.attend(t[0], t[1], t[2], bias=t[3]))(q, k, v, bias)
    for i in range(3):
        want = attnzoo.functional.attend(q[i], k[i], v[i], bias=bias[i])
        torch.testing.assert_close(out[i], want, **EXACT)
