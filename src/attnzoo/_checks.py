"""Input and argument checks shared by every module.

Each helper raises `ValueError` (or `TypeError` for a wrong type/dtype) with a message that names
the module, the argument, what was expected and what was given, *before* any heavy work runs.
"""

from __future__ import annotations

import collections
import functools
import inspect
import itertools
import numbers
import threading
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from attnzoo._fx import fx_leaf, own_code
from attnzoo._options import MAX_SIZE, check_options

__all__ = [
    "check_tensor", "check_dense", "numpy_bool", "check_shape", "check_same", "check_int", "check_length",
    "check_float",
    "check_dropout",
    "check_choice", "check_divisible", "check_head_widths", "check_mask", "format_shape", "check_options",
    "check_flags", "check_bool", "check_inputs", "checked", "autocast_on", "MAX_SIZE",
]



def format_shape(dims: Sequence[object]) -> str:
    """`(B, 256, H, W)` from `["B", 256, "H", "W"]`; a one-element shape keeps its comma."""
    inner = ", ".join(str(d) for d in dims)
    return f"({inner},)" if len(dims) == 1 else f"({inner})"


def check_tensor(x: object, who: str, name: str = "x", *, floating: bool = True) -> Tensor:
    """Raise `TypeError` unless `x` is a tensor (of a real floating dtype when `floating`)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who} expects {name} to be a torch.Tensor, got {type(x).__name__}")
    check_dense(x, who, name)
    if floating and not (x.is_floating_point() and not x.is_complex()):
        raise TypeError(f"{who} expects {name} to have a floating-point dtype, got {x.dtype}")
    return x


def check_dense(x: Tensor, who: str, name: str) -> None:
    """Raise `TypeError` for a sparse, MKL-DNN or nested tensor: the modules run strided tensors only."""
    if x.layout != torch.strided or x.is_nested:
        kind = "a nested tensor" if x.is_nested else f"layout {x.layout}"
        raise TypeError(f"{who} expects {name} to be a dense tensor (torch.strided), got {kind}: "
                        "convert it with .to_dense()")


def check_shape(x: object, who: str, spec: str, name: str = "x", *, floating: bool = True,
                allow_empty: bool = False, **sizes: int) -> dict[str, int]:
    """Check `x` against a shape spec such as `"B C H W"` with some letters fixed (`C=256`).

    Returns the actual size of every letter, so callers can unpack `H, W` without a second read.
    Letters repeated in `spec` must agree. A zero-sized dimension is rejected unless
    `allow_empty`: attention over nothing has no meaning, and an empty batch is almost always a
    data-loading bug.

    Example:
        ```python
        >>> dims = check_shape(torch.zeros(2, 8, 5, 5), "SqueezeExcite", "B C H W", C=8)
        >>> dims["H"]
        5
        ```
    """
    tensor = check_tensor(x, who, name, floating=floating)
    letters = spec.split()

    def expected() -> str:
        # Formatted only to raise: a size given as a SymInt (torch.compile with dynamic shapes) cannot
        # be turned into a string while Dynamo traces (fullgraph=True fails, otherwise a graph break).
        return format_shape([sizes.get(letter, letter) for letter in letters])

    got = tuple(tensor.shape)
    if tensor.ndim != len(letters):
        raise ValueError(
            f"{who} expects {name} of shape {expected()} ({len(letters)}-D), got {got} ({tensor.ndim}-D)"
        )
    found: dict[str, int] = {}
    for letter, size in zip(letters, got, strict=False):
        want = sizes.get(letter, found.get(letter))
        if want is not None and size != want:
            raise ValueError(f"{who} expects {name} of shape {expected()} with {letter}={want}, got {got}")
        found[letter] = size
    if not allow_empty and tensor.numel() == 0:
        raise ValueError(f"{who} expects a non-empty {name} of shape {expected()}, got {got}")
    return found


def check_same(value: object, expected: object, who: str, what: str) -> None:
    """Raise `ValueError` unless `value == expected` (for sizes that must agree between inputs)."""
    if value != expected:
        raise ValueError(f"{who} expects {what} to be {expected}, got {value}")


def check_int(value: object, name: str, who: str, *, minimum: int | None = 1,
              maximum: int | None = None) -> int:
    """A constructor argument that must be an `int` within `[minimum, maximum]` (`maximum` at most
    `MAX_SIZE`)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{who}: {name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{who}: {name} must be >= {minimum}, got {value}")
    maximum = MAX_SIZE if maximum is None else min(maximum, MAX_SIZE)
    if value > maximum:
        raise ValueError(f"{who}: {name} must be <= {maximum}, got {value}")
    return value


def check_length(value: object, name: str, who: str) -> int:
    """A size argument of a helper function: an integer >= 1 (numpy's too), or a `torch.SymInt`, which a
    size taken from a shape becomes under `torch.compile` with dynamic shapes, or the 0-dim integer
    tensor it becomes under `torch.jit.trace` (neither is compared: that would fix the traced size)."""
    if isinstance(value, torch.SymInt):
        return value  # type: ignore[return-value]
    if isinstance(value, Tensor) and torch.jit.is_tracing():
        if value.dim() == 0 and not value.is_floating_point():
            return value  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{who} expects {name} to be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{who} expects {name} >= 1, got {value}")
    return int(value)


def check_float(value: object, name: str, who: str, *, minimum: float | None = None,
                maximum: float | None = None, above: float | None = None) -> float:
    """A constructor argument that must be a real number within `[minimum, maximum]` (and `> above`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{who}: {name} must be a number, got {type(value).__name__} {value!r}")
    if value != value:  # NaN passes every comparison below
        raise ValueError(f"{who}: {name} must be a number, got nan")
    if minimum is not None and value < minimum:
        raise ValueError(f"{who}: {name} must be >= {minimum}, got {value}")
    if above is not None and not value > above:
        raise ValueError(f"{who}: {name} must be > {above}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{who}: {name} must be <= {maximum}, got {value}")
    return float(value)


def check_dropout(value: object, name: str, who: str) -> nn.Dropout:
    """A dropout option (a probability) as the `nn.Dropout` that applies it: modules hold their dropouts
    as such (the fused paths read `p`), as timm's do, so code that sets every `nn.Dropout` reaches them."""
    return nn.Dropout(check_float(value, name, who, minimum=0.0, maximum=1.0))


def check_choice(value: Any, choices: Iterable[Any], name: str, who: str) -> Any:
    """A constructor argument that must be one of `choices`."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{who}: {name} must be one of {options}, got {value!r}")
    return value


def check_divisible(value: int, divisor: int, name: str, divisor_name: str, who: str) -> None:
    """Raise `ValueError` unless `divisor` divides `value` (`dim % num_heads` and friends)."""
    if divisor == 0 or value % divisor != 0:
        raise ValueError(f"{who}: {name}={value} must be divisible by {divisor_name}={divisor}")


def check_head_widths(dim: int, num_heads: int, head_dim: int | None, value: int | None, who: str,
                      name: str | None = "head_dim", *, dim_name: str = "dim",
                      heads_name: str = "num_heads") -> tuple[int, int]:
    """`(head_dim, value_head_dim)` of a multi-head layer (the head width's argument called `name`, None
    where the class has none): `dim // num_heads` unless given (then `dim` must divide evenly), values as
    wide unless given. `dim_name`/`heads_name`: the class's own names of the two (timm's `dim_out`)."""
    if head_dim is None and dim % num_heads != 0:
        hint = f" (or give {name})" if name else ""  # no hint to give an argument the class does not take
        raise ValueError(f"{who}: {dim_name}={dim} must be divisible by {heads_name}={num_heads}{hint}")
    qk = dim // num_heads if head_dim is None else check_int(head_dim, name or "head_dim", who)
    return qk, qk if value is None else check_int(value, "value_head_dim", who)


def check_mask(mask: object, target: Sequence[int], who: str, name: str = "mask") -> Tensor:
    """A mask or bias that must broadcast to `target` (for example `(B, h, L, S)`).

    Accepts bool (True = may attend) or floating (additive) tensors. Broadcasting is checked here,
    dimension by dimension from the right, so a wrong mask never broadcasts silently into a
    different meaning.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{who} expects {name} to be a torch.Tensor, got {type(mask).__name__}")
    check_dense(mask, who, name)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"{who} expects {name} to be bool (True = may attend) or floating (additive), got {mask.dtype}"
        )
    shape = tuple(mask.shape)
    fits = len(shape) <= len(target) and all(
        m in (1, t) for m, t in zip(reversed(shape), reversed(tuple(target)), strict=False)
    )
    if not fits:
        raise ValueError(f"{who} expects {name} broadcastable to {tuple(target)}, got {shape}")
    return mask


# ---------------------------------------------------------------------------------------------
# Checks applied to every registered and compat class at once (see `checked`): constructor
# options against their annotations, and every forward's tensors against the module's parameters.

_depth = threading.local()  # constructors nest (compat -> canonical): only the outermost checks


def numpy_bool(value: object) -> bool:
    """A numpy bool (`np.True_`), which torch's own switches take (numpy is not imported for it)."""
    kind = type(value)
    return kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool")


def check_flags(who: str, flags: Sequence[tuple[int, str]], args: tuple, kwargs: dict) -> None:
    """A forward's boolean switches (`need_weights`, `causal`) are bools: `need_weights="no"`
    would otherwise count as True. `flags` are `(position after self, name)` pairs."""
    for position, name in flags:
        check_bool(args[position] if position < len(args) else kwargs.get(name, False), name, who)


def check_bool(value: object, name: str, who: str) -> bool:
    """A switch that must be a bool (or a numpy bool, as torch's take): `"no"` would count as True."""
    if not isinstance(value, bool) and not numpy_bool(value):
        kind = type(value)
        where = "" if kind.__module__ == "builtins" else f"{kind.__module__}."  # numpy.float64
        raise TypeError(f"{who}: {name} must be a bool, got {where}{kind.__qualname__} {value!r}")
    return bool(value)


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for `device_type`; False for devices autocast does not know (`meta`),
    where `torch.is_autocast_enabled` raises instead of answering."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def check_inputs(module: nn.Module, names: Sequence[str], args: tuple, kwargs: dict) -> None:
    """Every floating tensor a forward receives matches the module's parameters in dtype (autocast
    aside) and every tensor their device; raised before any work, naming what was expected.

    `names`: the forward's positional parameter names; `dtype_free_parameters` are not the reference."""
    if torch.compiler.is_compiling():
        return
    own = _tree_tensors(module, [])  # one walk of the tree serves the reference and the device check
    reference = _reference(module, own)
    nested = getattr(module, "takes_nested", False)  # torch's MHA API: the forward pads them, checks again
    named = [(names[i] if i < len(names) else f"input {i}", a) for i, a in enumerate(args)]
    named += list(kwargs.items())
    tensors = [(name, a) for name, a in named if isinstance(a, Tensor) and not (nested and a.is_nested)]
    if not tensors:
        return
    device = reference.device if reference is not None else tensors[0][1].device
    where = "where its parameters are" if reference is not None else f"the device of {tensors[0][0]}"
    who = type(module).__name__
    if any(t is not None and t.device != device for t in own):
        _stray_tensor(module, device, who, where)
    for name, t in tensors:
        check_dense(t, who, name)
        if t.device != device:
            raise ValueError(f"{who} expects {name} on device {device} ({where}), got {t.device}")
    if reference is None or autocast_on(device.type):
        return
    for name, t in tensors:
        free = any(part in name for part in ("mask", "bias", "rope"))  # timm's rope comes in float32
        if t.is_floating_point() and t.dtype != reference.dtype and not free:
            raise TypeError(
                f"{who} expects {name} of dtype {reference.dtype} (the dtype of its parameters), got "
                f"{t.dtype}: convert the input with .to({reference.dtype}) or the module with .to({t.dtype})"
            )


def _tree_tensors(module: nn.Module, out: list[Tensor | None]) -> list[Tensor | None]:
    """Every parameter and buffer of the module's tree (None entries included), by the modules' own
    tables: a few microseconds, a third of `parameters()` and `buffers()` together."""
    out.extend(module._parameters.values())
    out.extend(module._buffers.values())
    for child in module._modules.values():
        if child is not None:
            _tree_tensors(child, out)
    return out


def _reference(module: nn.Module, own: list[Tensor | None]) -> Tensor | None:
    """The first floating parameter (else buffer) of the tree, as `parameters()` then `buffers()` order them,
    leaving out those a module keeps in float32 whatever its dtype (`dtype_free_parameters`)."""
    free = {id(getattr(module, name, None)) for name in getattr(module, "dtype_free_parameters", ())}
    floating = [t for t in own if t is not None and t.is_floating_point() and id(t) not in free]
    return next((t for t in floating if isinstance(t, nn.Parameter)), floating[0] if floating else None)


def _stray_tensor(module: nn.Module, device: torch.device, who: str, where: str) -> None:
    """Raise for a module whose tensors are not all on `device`: naming the first one off the device most of
    them are on (a real one before meta), as the reference itself may be the stray one. A module built on
    the meta device and loaded with `load_state_dict(assign=True)` keeps the tensors the load does not
    reach (its non-persistent buffers, or those a non-strict load leaves out) on meta, and indexing with
    one, or a product with one, reads uninitialised memory instead of failing."""
    named = list(itertools.chain(module.named_parameters(), module.named_buffers()))
    counts = collections.Counter(t.device for _, t in named)
    home = max(counts, key=lambda d: (d.type != "meta", counts[d]))
    name, stray = next(((n, t) for n, t in named if t.device != home), (None, None))
    if name is None or stray is None:  # all on one device, not the input's (no floating reference)
        raise ValueError(f"{who} holds its tensors on device {home}, expected {device} ({where})")
    hint = ""
    if stray.device.type == "meta":
        hint = (": built on the meta device, a tensor that load_state_dict(assign=True) does not reach stays "
                f"there (a non-persistent buffer, or one a non-strict load leaves out); build it on {home}")
    raise ValueError(f"{who} holds {name} on device {stray.device} and its other tensors on {home}{hint}")


ClassT = TypeVar("ClassT", bound=type)

_BN_ONE_VALUE = "Expected more than 1 value per channel when training"


def _batch_norm_error(module: nn.Module, names: Sequence[str], args: tuple, err: ValueError) -> ValueError:
    """torch's BatchNorm refuses one value per channel in training (batch 1 after pooling, or batch 1
    of 1x1 maps) deep inside the forward: say which module and input, and what to change."""
    first = next((a for a in args if isinstance(a, Tensor)), None)
    name = names[0] if names else "x"
    given = f"{name} of shape {tuple(first.shape)}" if first is not None else "its input"
    return ValueError(
        f"{type(module).__name__} in training mode needs more than one value per channel at a BatchNorm "
        f"inside it ({err}), got {given}: use a batch of 2 or more (or larger maps), or .eval()"
    )


def checked(cls: ClassT, *, flags: bool = True) -> ClassT:
    """Apply `check_options` to `cls`'s constructor and `check_inputs` to its forward, in place; with
    `flags`, also `check_flags` to the forward's `bool` arguments (canonical classes: a compat class
    takes what its original took, `need_weights=1` included)."""
    init, forward = cls.__dict__.get("__init__"), cls.__dict__.get("forward")
    if init is not None and not getattr(init, "_attnzoo_checked", False):
        signature = inspect.signature(init)

        @functools.wraps(init)
        def checked_init(self: nn.Module, *args: Any, **kwargs: Any) -> None:
            outermost = getattr(_depth, "value", 0) == 0
            if outermost:
                check_options(cls.__name__, signature, args, kwargs, getattr(cls, "infinite_options", ()))
            _depth.value = getattr(_depth, "value", 0) + 1
            try:
                init(self, *args, **kwargs)
            finally:
                _depth.value -= 1

        checked_init._attnzoo_checked = True  # type: ignore[attr-defined]
        cls.__init__ = checked_init  # type: ignore[misc]
    if forward is not None and not getattr(forward, "_attnzoo_checked", False):
        params = list(inspect.signature(forward).parameters.values())[1:]
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        switches = [(i, p.name) for i, p in enumerate(params) if flags and p.annotation == "bool"
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        switches = [(i if params[i].kind == params[i].POSITIONAL_OR_KEYWORD else len(params), n)
                    for i, n in switches]

        @functools.wraps(forward)
        def checked_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            check_inputs(self, names, args, kwargs)
            if switches:
                check_flags(type(self).__name__, switches, args, kwargs)
            try:
                return forward(self, *args, **kwargs)
            except ValueError as err:
                if not str(err).startswith(_BN_ONE_VALUE):
                    raise
                raise _batch_norm_error(self, names, args, err) from err

        own_code(checked_forward, cls)
        checked_forward._attnzoo_checked = True  # type: ignore[attr-defined]
        cls.forward = checked_forward  # type: ignore[attr-defined]
    return fx_leaf(cls)  # one call_module node in FX traces, a clear TorchScript refusal
