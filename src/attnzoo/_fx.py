"""attnzoo modules inside models that torch.fx traces, or that TorchScript is asked to compile.

torch's own modules are leaves of an FX trace (one ``call_module`` node; `torch.fx.Tracer.is_leaf_module`
says so for ``torch.nn``), which is how ``torchvision``'s ``create_feature_extractor`` and FX passes see
``nn.MultiheadAttention`` or torchvision's attention. After `attnzoo.replace` the same place holds an
attnzoo module, whose forward checks its inputs' shapes and values and picks kernels: symbolic proxies
cannot run it. So an attnzoo module traced as a submodule records itself as one ``call_module``
node, as torch's modules do, and the traced graph calls it eagerly. Traced as the root itself there
is no parent to call it from: that raises ``TypeError`` naming what works instead.

TorchScript cannot compile these modules (dynamic kernel choice, keyword-only helpers, Python
containers): ``torch.jit.script`` raises ``TypeError`` saying so, before TorchScript's own error from
deep inside a forward.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from typing import Any, TypeVar

import torch.fx
from torch import nn

__all__ = ["fx_leaf", "traced_call"]

ClassT = TypeVar("ClassT", bound=type)


def _symbolic_tracing() -> bool:
    """Whether torch.fx's symbolic tracer is running (a thread-local flag; False under torch.compile)."""
    probe = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None)
    return True if probe is None else bool(probe())


def _traced_as_root(module: nn.Module) -> TypeError:
    who = type(module).__name__
    return TypeError(
        f"torch.fx cannot trace {who} itself: attnzoo modules check their inputs and choose kernels at "
        f"run time, so a traced model records them as one call_module node (as torch's own modules); "
        f"trace a model that holds it (nn.Sequential({who}(...)) will do), or use torch.export"
    )


def traced_call(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``module`` as one ``call_module`` node when an FX tracer runs it on proxies; None otherwise."""
    if not _symbolic_tracing():
        return None
    try:
        values = itertools.chain(args, kwargs.values())
        proxy = next((a for a in values if isinstance(a, torch.fx.Proxy)), None)
    except torch.fx.proxy.TraceError:  # the root's `*args` came as one proxy: this module is the root
        raise _traced_as_root(module) from None
    tracer = None if proxy is None else proxy.tracer
    if not isinstance(tracer, torch.fx.Tracer):  # no proxy, or a tracer that has no module paths
        return None
    if getattr(tracer, "root", None) is module:
        raise _traced_as_root(module)
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, kwargs)


def _refuse_script(self: nn.Module) -> nn.Module:
    raise TypeError(
        f"torch.jit.script cannot compile attnzoo's {type(self).__name__} (TorchScript takes a subset of "
        f"Python that attnzoo's modules do not keep to); use torch.jit.trace, torch.export or torch.compile"
    )


class _LegacyOnnxError(TypeError):
    """The TorchScript-based ONNX exporter called a forward the way no user does (raised once, by the
    outermost leaf wrapper that sees it)."""


def _legacy_onnx_export() -> bool:
    """Whether `torch.onnx.export(..., dynamo=False)` is tracing (`dynamo=True` does not jit-trace)."""
    return torch.onnx.is_in_onnx_export() and torch.jit.is_tracing()


def _called_as_legacy_export(forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether the call is that exporter's own (of the exported root): a tensor where forward's default
    is a plain value (`need_weights`), or arguments that do not bind (keyword-only ones by position).
    Inside an exported model a module is called as written, and its TypeError is the user's to read."""
    signature = inspect.signature(forward)
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError:
        return True
    plain = {name for name, p in signature.parameters.items()
             if p.default is not inspect.Parameter.empty and not isinstance(p.default, torch.Tensor | None)}
    return any(isinstance(value, torch.Tensor) for name, value in bound.arguments.items() if name in plain)


def _legacy_onnx_message(module: nn.Module, err: TypeError) -> str:
    # That exporter passes every default argument of forward, as a tensor (`need_weights=tensor(False)`),
    # and keyword-only ones by position: the module's own error would name neither cause nor remedy.
    return (
        f"torch.onnx.export(..., dynamo=False) cannot export attnzoo's {type(module).__name__}: the "
        f"TorchScript-based exporter calls forward with its default arguments as tensors and keyword-only "
        f"ones by position ({err}); export with dynamo=True (torch's default), or export a model that holds "
        f"it (nn.Sequential({type(module).__name__}(...)) will do)"
    )


def own_code(function: Any, owner: type) -> None:
    """Give a forward wrapper a code object of its own, named after its class: torch.compile keeps its
    compiled entries per code object, at most `recompile_limit` (8), so one wrapper shared by every class
    sent the ninth class compiled on its own back to eager (an error with fullgraph=True)."""
    function.__code__ = function.__code__.replace(co_name=f"{function.__name__}_{owner.__name__}")


def fx_leaf(cls: ClassT) -> ClassT:
    """Make ``cls`` a leaf of FX traces (`traced_call`) and refuse TorchScript by name, in place; for a
    class whose forward `attnzoo._checks.checked` does not wrap (those it wraps get the same)."""
    forward = cls.__dict__.get("forward")
    if forward is not None and not getattr(forward, "_attnzoo_fx_leaf", False):

        @functools.wraps(forward)
        def leaf_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            traced = traced_call(self, args, kwargs)
            if traced is not None:
                return traced
            try:
                return forward(self, *args, **kwargs)
            except TypeError as err:
                if (isinstance(err, _LegacyOnnxError) or not _legacy_onnx_export()
                        or not _called_as_legacy_export(forward, args, kwargs)):
                    raise
                raise _LegacyOnnxError(_legacy_onnx_message(self, err)) from err

        own_code(leaf_forward, cls)
        leaf_forward._attnzoo_fx_leaf = True  # type: ignore[attr-defined]
        cls.forward = leaf_forward  # type: ignore[attr-defined]
    if "__prepare_scriptable__" not in cls.__dict__:
        cls.__prepare_scriptable__ = _refuse_script  # type: ignore[attr-defined]
    if "__init_subclass__" not in cls.__dict__:
        # A user's subclass whose forward does work and then calls super().forward() must be the leaf
        # itself: were only the inherited forward one, the trace would record that work and then a
        # call of the module, which runs the subclass's forward (and the work) again.
        def init_subclass(sub: type, **kwargs: Any) -> None:
            super(cls, sub).__init_subclass__(**kwargs)  # type: ignore[misc, arg-type]
            fx_leaf(sub)

        cls.__init_subclass__ = classmethod(init_subclass)  # type: ignore[assignment]
    return cls
