"""The input-check helpers every module uses, and the shared rules they apply to every registered and
compat class (sizes, layouts, derived widths, epsilons)."""

from __future__ import annotations

import inspect

import pytest
import torch
from tests.test_adversarial import CASES, IDS, build, inputs, options

import attnzoo
from attnzoo._checks import (
    MAX_SIZE,
    check_choice,
    check_divisible,
    check_float,
    check_int,
    check_mask,
    check_shape,
    check_tensor,
)


def test_check_shape_returns_sizes_and_names_expected_and_given():
    dims = check_shape(torch.zeros(2, 8, 5, 6), "Mod", "B C H W", C=8)
    assert dims == {"B": 2, "C": 8, "H": 5, "W": 6}
    with pytest.raises(
        ValueError, match=r"Mod expects x of shape \(B, 8, H, W\) with C=8, got \(2, 7, 5, 6\)"
    ):
        check_shape(torch.zeros(2, 7, 5, 6), "Mod", "B C H W", C=8)
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\) \(4-D\), got \(2, 8, 5\) \(3-D\)"):
        check_shape(torch.zeros(2, 8, 5), "Mod", "B C H W", C=8)
    with pytest.raises(ValueError, match="non-empty"):
        check_shape(torch.zeros(0, 8, 5, 6), "Mod", "B C H W", C=8)
    with pytest.raises(TypeError, match="floating-point dtype, got torch.int64"):
        check_shape(torch.zeros(2, 8, 5, 6, dtype=torch.int64), "Mod", "B C H W")
    with pytest.raises(TypeError, match="floating-point dtype, got torch.complex64"):
        check_shape(torch.zeros(2, 8, 5, 6, dtype=torch.complex64), "Mod", "B C H W")
    with pytest.raises(TypeError, match="torch.Tensor, got list"):
        check_shape([1, 2], "Mod", "B C")


def test_check_shape_repeated_letters_must_agree():
    check_shape(torch.zeros(2, 4, 4), "Mod", "B N N")
    with pytest.raises(ValueError, match="N=4"):
        check_shape(torch.zeros(2, 4, 5), "Mod", "B N N")


def test_argument_checks():
    assert check_int(3, "heads", "Mod") == 3
    with pytest.raises(TypeError, match="heads must be an int, got float"):
        check_int(3.0, "heads", "Mod")
    with pytest.raises(TypeError, match="must be an int, got bool"):
        check_int(True, "heads", "Mod")
    with pytest.raises(ValueError, match="heads must be >= 1, got 0"):
        check_int(0, "heads", "Mod")
    with pytest.raises(ValueError, match="mode must be one of"):
        check_choice("x", ("a", "b"), "mode", "Mod")
    with pytest.raises(ValueError, match="dim=10 must be divisible by num_heads=3"):
        check_divisible(10, 3, "dim", "num_heads", "Mod")


def test_check_mask_broadcasting():
    check_mask(torch.ones(5, 7, dtype=torch.bool), (2, 3, 5, 7), "Mod")
    check_mask(torch.ones(2, 1, 1, 7), (2, 3, 5, 7), "Mod")
    with pytest.raises(ValueError, match=r"broadcastable to \(2, 3, 5, 7\), got \(3, 7\)"):
        check_mask(torch.ones(3, 7), (2, 3, 5, 7), "Mod")
    with pytest.raises(ValueError, match="broadcastable"):
        check_mask(torch.ones(1, 2, 3, 5, 7), (2, 3, 5, 7), "Mod")


def test_sizes_floats_and_layouts():
    with pytest.raises(ValueError, match=rf"heads must be <= {MAX_SIZE}, got {2**40}"):
        check_int(2**40, "heads", "Mod")
    assert check_float(1e-9, "eps", "Mod", above=0.0) == 1e-9
    with pytest.raises(ValueError, match=r"eps must be > 0.0, got 0"):
        check_float(0, "eps", "Mod", above=0.0)
    for bad in (torch.ones(2, 3).to_sparse(), torch.ones(2, 3).to_mkldnn()):
        with pytest.raises(TypeError, match=r"Mod expects x to be a dense tensor \(torch.strided\), got"):
            check_tensor(bad, "Mod")
    with pytest.raises(TypeError, match="mask to be a dense tensor"):
        check_mask(torch.ones(2, 3, dtype=torch.bool).to_sparse(), (2, 3), "Mod")


# ---------------------------------------------------------------------------------------------
# The shared rules over every registered and compat class (cases and builders of the adversarial sweep)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sparse_inputs_are_refused_by_name(case):
    """A sparse input reached torch ops that have no sparse kernel (RuntimeError, NotImplementedError)."""
    module = build(case).eval()
    xs = inputs(case)
    names = [p for p in inspect.signature(case.cls.forward).parameters if p != "self"]
    for i in range(len(xs)):
        with pytest.raises(TypeError, match=rf"{names[i]} to be a dense tensor"):
            module(*xs[:i], xs[i].to_sparse(), *xs[i + 1:])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_huge_integer_options_are_refused_by_name(case):
    """2**40 overflowed torch's 32-bit kernel arguments or storage sizes, or built layers for hours."""
    for name, param in options(case).items():
        if "int" in str(param.annotation):
            with pytest.raises((ValueError, TypeError), match=name):
                build(case, **{name: 2**40})


WIDENING = [("se", "reduction", 1e-30), ("cbam", "reduction", 1e-30), ("cbam_res", "reduction", 1e-30),
            ("sk", "reduction", 1e-30), ("splat", "reduction", 1e-30), ("bat", "reduction", 1e-30),
            ("coord", "reduction", 1e-45), ("eca", "gamma", 1e-30), ("eca", "beta", 1e30),
            ("bottleneck", "qk_ratio", 1e30), ("halo", "qk_ratio", 1e30), ("lambda", "qk_ratio", 1e30)]


@pytest.mark.parametrize(("name", "option", "value"), WIDENING)
def test_float_options_giving_impossible_widths_are_refused_by_name(name, option, value):
    """channels / reduction = 8e30 reached torch.empty (a TypeError about unpacking a long long)."""
    spec = attnzoo.get_spec(name)
    derived = {"rd_channels": None, "head_dim": None}  # the widths derived from the option
    kwargs = {**spec.example.kwargs, **{k: v for k, v in derived.items() if k in spec.example.kwargs}}
    with pytest.raises(ValueError, match=rf"{option}.*gives a (width|kernel size) of .*more than"):
        spec.cls(**{**kwargs, option: value})


EPSILONS = [("sge", "eps"), ("shuffle", "eps"), ("simam", "e_lambda"), ("linear", "eps"),
            ("self_attention_block", "eps"), ("cross_attention_block", "eps")]


@pytest.mark.parametrize(("name", "option"), EPSILONS)
def test_zero_epsilon_is_refused_and_a_tiny_one_stays_finite(name, option):
    """eps = 0 gave NaN on constant inputs (0 / 0 in a normalisation); a small eps > 0 keeps them finite."""
    spec = attnzoo.get_spec(name)
    with pytest.raises(ValueError, match=rf"{option} must be > 0"):
        spec.cls(**{**spec.example.kwargs, option: 0.0})
    module = spec.cls(**{**spec.example.kwargs, option: 1e-12})
    for fill in (0.0, 3.0, -1e4):
        xs = [torch.full(s, fill, requires_grad=True) for s in spec.example.inputs]
        out = module(*xs)
        out.square().sum().backward()
        assert torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in xs), (name, fill)


def test_an_unknown_keyword_is_named_with_what_the_class_takes():
    # Python names a missing argument first: create("MultiHeadAttention", d_model=16) said only that
    # 'dim' was missing, not that d_model is the seed's name (attnzoo.compat.MultiHeadAttention's).
    with pytest.raises(TypeError, match=r"MultiHeadAttention: got an unexpected keyword argument 'd_model'; "
                       r"it takes dim, num_heads, .*\(attnzoo.compat.MultiHeadAttention, the seed's"):
        attnzoo.create("MultiHeadAttention", d_model=16, num_heads=4)
    with pytest.raises(TypeError, match=r"SqueezeExcite: got unexpected keyword arguments 'reductio', 'x'; "
                       r"it takes channels, reduction,") as info:
        attnzoo.create("se", 16, reductio=4, x=1)
    assert "attnzoo.compat" not in str(info.value)


# Modules whose checks met a SymInt in Python code Dynamo cannot trace: check_shape formatted its
# expected shape (str of a size taken from another input) before checking, EMSA took math.isqrt of N.
SYMBOLIC = ["additive", "concat", "cross_attention_block", "dot", "emsa", "general", "gfnet", "location",
            "mha", "muse", "shifted_window", "ufo"]


@pytest.mark.parametrize("name", SYMBOLIC)
def test_checks_trace_with_dynamic_shapes_in_one_graph(name):
    """torch.compile(dynamic=True, fullgraph=True) at two batch sizes: forward and input gradients equal
    eager (Dynamo's own backend: the fault was in tracing, which every backend shares)."""
    spec = attnzoo.get_spec(name)
    torch.manual_seed(0)
    module = attnzoo.create(name, **spec.example.kwargs)
    compiled = torch.compile(module, backend="eager", dynamic=True, fullgraph=True)
    for batch in (2, 3):
        gen = torch.Generator().manual_seed(batch)
        xs = [torch.randn(batch, *s[1:], generator=gen, requires_grad=True) for s in spec.example.inputs]
        got = compiled(*xs)
        got_grads = torch.autograd.grad(got.square().sum(), xs)
        want = module(*xs)
        want_grads = torch.autograd.grad(want.square().sum(), xs)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_grads, want_grads)
