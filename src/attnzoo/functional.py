"""The one dot-product attention path of attnzoo, and the relative-position helpers.

Multi-head attention, the transformer blocks, BiFormer, the non-local block and the scoring rules
call `attend`. Without ``need_weights`` it runs
``torch.nn.functional.scaled_dot_product_attention`` (through `attnzoo.kernels.flash.sdpa`, which
gives the CPU flash kernel a double backward), so the fused kernels never keep an L x S matrix
for backward; with it (or with the fused path switched off) it runs a plain math path that returns
the weights. Three exact kernels cover what SDPA serves badly on CPU and fall back to `attend`
when fusion is off: `attnzoo.kernels.biased` (Swin windows, temporal attention: tiny maps
with a learnable bias), `attnzoo.kernels.blocked` (SAGAN: query and value widths differ) and ACmix's
neighbourhood kernel (`attnzoo.mechanisms.acmix.neighbourhood_attention`).

Mask convention (the SDPA one, the inverse of `nn.MultiheadAttention`): a **boolean mask is True
where a query may attend**; a floating mask is added to the logits.

Shape letters: B batch, h heads, L query length, S key length, d head dim (q, k), e value head dim.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import threading
from collections.abc import Iterator
from typing import Literal, cast, overload

import torch
from torch import Tensor

from attnzoo._checks import autocast_on, check_mask, check_tensor, format_shape, numpy_bool
from attnzoo._relative import gather_relative_bias, relative_position_index_1d, relative_position_index_2d
from attnzoo.kernels.dropout import dropout_product
from attnzoo.kernels.flash import sdpa
from attnzoo.kernels.route import host_readable

__all__ = [
    "attend",
    "fused_attn",
    "fused_enabled",
    "relative_position_index_1d",
    "relative_position_index_2d",
    "gather_relative_bias",
]

_ENV_FUSED = "ATTNZOO_FUSED_ATTN"
_override = threading.local()


def fused_enabled() -> bool:
    """Whether `attend` uses `scaled_dot_product_attention` (read at call time).

    The innermost `fused_attn` context wins; otherwise the environment variable
    `ATTNZOO_FUSED_ATTN` (`0` switches the fused path off); otherwise on.
    """
    stack = getattr(_override, "stack", None)
    if stack:
        return bool(stack[-1])
    return os.environ.get(_ENV_FUSED, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def fused_attn(enabled: bool) -> Iterator[None]:
    """Switch the fused path on or off inside a `with` block (thread-local, nestable).

    Example:
        ```python
        >>> import torch, attnzoo
        >>> from attnzoo.functional import attend
        >>> q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)  # (B, h, L, d) each
        >>> with attnzoo.fused_attn(False):   # the plain math path, for checking or FLOP counting
        ...     y = attend(q, k, v)
        >>> torch.allclose(y, attend(q, k, v), atol=1e-5)  # the fused path gives the same output
        True
        ```
    """
    if not isinstance(enabled, bool) and not numpy_bool(enabled):  # "False" would switch it on
        raise TypeError(f"fused_attn expects enabled to be a bool, got {type(enabled).__name__} {enabled!r}")
    stack = getattr(_override, "stack", None)
    if stack is None:
        stack = _override.stack = []
    stack.append(bool(enabled))
    try:
        yield
    finally:
        stack.pop()


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    who = "attend"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, who, name)
        if t.ndim != 4:
            raise ValueError(f"{who} expects {name} of shape (B, h, L, d) (4-D), got {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{who} expects q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h):
        raise ValueError(
            f"{who} expects k and v with batch and heads (B, h) = {(b, h)}, "
            f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[-1] != d:
        raise ValueError(f"{who} expects k of shape {format_shape([b, h, 'S', d])}, got {tuple(k.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(
            f"{who} expects v of shape {format_shape([b, h, k.shape[2], 'e'])} (S as k), got {tuple(v.shape)}"
        )
    if d == 0:  # the default scale 1 / sqrt(d) has no value, and no logit carries information
        raise ValueError(f"{who} expects q and k with head width d >= 1, got q {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{who} expects {name} on the device of q ({q.device}), got {t.device}")


def _check_options(
    mask: Tensor | None, bias: Tensor | None, causal: object, dropout_p: object, scale: object,
    need_weights: object, device: torch.device,
) -> None:
    """Types and values of attend's keyword arguments, and the masks' device."""
    who = "attend"
    for name, flag in (("causal", causal), ("need_weights", need_weights)):
        if not isinstance(flag, bool) and not numpy_bool(flag):
            raise TypeError(f"{who} expects {name} to be a bool, got {type(flag).__name__} {flag!r}")
    for name, value in (("dropout_p", dropout_p), ("scale", scale)):
        if value is None and name == "scale":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{who} expects {name} to be a number, got {type(value).__name__} {value!r}")
        # `abs(x) < inf` rather than math.isfinite: under torch.compile a float that changed between
        # compiles of one frame becomes a SymFloat, which math.isfinite cannot take (NaN fails both)
        if not abs(cast(float, value)) < math.inf:
            raise ValueError(f"{who} expects a finite {name}, got {value}")
    if not 0.0 <= cast(float, dropout_p) <= 1.0:
        raise ValueError(f"{who} expects dropout_p in [0, 1], got {dropout_p}")
    for name, term in (("mask", mask), ("bias", bias)):
        if isinstance(term, Tensor) and term.device != device:
            raise ValueError(f"{who} expects {name} on the device of q ({device}), got {term.device}")


def _autocast(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Under `torch.autocast`, attention runs in the autocast dtype (as SDPA does there).

    Projections inside autocast come out in the low precision while raw inputs stay float32; without
    this the dtype check below would refuse a mix that autocast itself produced. torch's autocast
    leaves float64 tensors alone, so a float64 model keeps its precision (its float64 projections would
    refuse a low-precision output): when any of q, k, v is float64 nothing is cast (a float64 and
    float32 mix then meets the dtype check, as SDPA refuses it under autocast too).
    """
    tensors = (q, k, v)
    if not all(isinstance(t, Tensor) and t.is_floating_point() for t in tensors):
        return q, k, v
    device_type = q.device.type
    if not autocast_on(device_type) or any(t.dtype == torch.float64 for t in tensors):
        return q, k, v
    dtype = torch.get_autocast_dtype(device_type)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _causal_keep(length_q: int, length_k: int, device: torch.device) -> Tensor:
    # Top-left aligned, as SDPA's is_causal: query i sees keys 0..i.
    return torch.ones(length_q, length_k, dtype=torch.bool, device=device).tril()


def _merge_masks(
    mask: Tensor | None,
    bias: Tensor | None,
    causal: bool,
    target: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor | None, Tensor | None]:
    """Combine mask, bias and causal into one SDPA `attn_mask`; also return fully masked rows.

    Returns `(attn_mask, dead)`: `attn_mask` is bool (True = keep) when there is no float term,
    else an additive float tensor; `dead` is a bool `(..., L, 1)` tensor marking queries that
    may attend to nothing (their output is defined as zero), or None when there are none.
    """
    keep: Tensor | None = None
    additive: Tensor | None = None
    for term in (mask, bias):
        if term is None:
            continue
        if term.ndim < 2:  # a 0-d or 1-d term broadcasts as rows of keys: the row reductions need 2-D
            term = term.reshape(*(1,) * (2 - term.ndim), *term.shape)
        if term.dtype == torch.bool:
            keep = term if keep is None else keep & term
        else:
            term = term.to(dtype)
            additive = term if additive is None else additive + term
    if causal:
        tri = _causal_keep(target[-2], target[-1], device)
        keep = tri if keep is None else keep & tri
    if keep is None and additive is None:
        return None, None
    # A row is dead when every entry is masked: False in `keep` or -inf in the additive part. One
    # reduction finds them (the row's max is -inf, or no True in keep), with no (L, S) bool temporary.
    if additive is not None:
        if keep is not None:
            additive = additive.masked_fill(~keep, float("-inf"))
            keep = None
        if additive.shape[-1] == 0:  # no keys: every row is dead (amax cannot reduce an empty row)
            dead: Tensor | None = additive.new_ones((*additive.shape[:-1], 1), dtype=torch.bool)
        else:
            dead = additive.detach().amax(dim=-1, keepdim=True) == float("-inf")
    else:
        dead = ~cast(Tensor, keep).any(dim=-1, keepdim=True)
    # (on meta, while compiling and under vmap no value can be read: the fill stays, correct either way)
    if host_readable(cast(Tensor, dead)) and not bool(cast(Tensor, dead).any()):
        dead = None
    if additive is None:
        merged = keep
        if dead is not None and merged is not None:  # dead rows come from keep here
            merged = merged | dead  # let dead rows attend to everything, then zero their output
        return merged, dead
    if dead is not None:
        additive = additive.masked_fill(dead, 0.0)
    return additive, dead


@overload
def attend(
    q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = ..., mask: Tensor | None = ...,
    causal: bool = ..., dropout_p: float = ..., scale: float | None = ...,
    need_weights: Literal[False] = ...,
) -> Tensor: ...
@overload
def attend(
    q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = ..., mask: Tensor | None = ...,
    causal: bool = ..., dropout_p: float = ..., scale: float | None = ..., need_weights: Literal[True],
) -> tuple[Tensor, Tensor]: ...
@overload
def attend(
    q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = ..., mask: Tensor | None = ...,
    causal: bool = ..., dropout_p: float = ..., scale: float | None = ..., need_weights: bool,
) -> Tensor | tuple[Tensor, Tensor]: ...
def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    need_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""Scaled dot-product attention: $\mathrm{softmax}(s\,QK^\top + \mathrm{bias} + \mathrm{mask})V$.

    Args:
        q: Queries.
        k: Keys.
        v: Values.
        bias: Additive float term (relative position bias, ...), broadcastable to `(B, h, L, S)`.
            Default: None.
        mask: Bool, **True = may attend** (the SDPA convention, the inverse of
            `nn.MultiheadAttention`), or float, added to the logits; broadcastable to
            `(B, h, L, S)`. Default: None.
        causal: Query i attends keys `0..i` only (top-left aligned when L != S, as SDPA).
            Default: False.
        dropout_p: Dropout on the attention weights; pass `0.0` in eval mode. On the CPU it draws
            the mask torch's own dropout draws (the same seed gives the same mask). Default: 0.0.
        scale: Multiplies the logits. Default: `1 / sqrt(d)`.
        need_weights: Also return the attention weights (runs the math path, which keeps the
            `(B, h, L, S)` matrix); with dropout they are the weights before dropout (torch's
            `nn.MultiheadAttention` returns them after). Default: False.

    Returns:
        The output `(B, h, L, e)`; with `need_weights`, `(output, weights)` with weights
        `(B, h, L, S)`. A query whose every key is masked gets zero output and zero weights
        (never NaN). NaN in q, k, v or +inf in a float mask propagates, as in SDPA.

    Shape:
        - q: `(B, h, L, d)`; k: `(B, h, S, d)`; v: `(B, h, S, e)`.

    Half-precision inputs take their softmax in float32 on the math path (the fused kernels do so
    internally).
    """
    q, k, v = _autocast(q, k, v)
    _check_qkv(q, k, v)
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if mask is not None:
        check_mask(mask, target, "attend", "mask")
    if bias is not None:
        check_mask(bias, target, "attend", "bias")
        if bias.dtype == torch.bool:
            raise TypeError(
                "attend expects bias to be a floating (additive) tensor, got torch.bool; use mask="
            )
    _check_options(mask, bias, causal, dropout_p, scale, need_weights, q.device)
    causal, need_weights = bool(causal), bool(need_weights)  # numpy bools become Python's (SDPA's)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)

    # SDPA's CPU kernels take neither dropout nor a bias that needs a gradient: torch then runs its
    # math path, which saves scaled copies of q and k and adds passes over (L, S) (a separate bias
    # add, a safe softmax). attnzoo's math path writes scale * q k^T + bias in one product and saves
    # q and k as given.
    # Under a functorch transform (`torch.func.grad` of the input) a float mask or bias built from
    # parameters needs a gradient at a level `requires_grad` does not show: the flash kernel refuses it.
    grad_bias = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    hidden = torch._C._are_functorch_transforms_active() and any(
        t is not None and t.is_floating_point() for t in (mask, bias))
    cpu_math = q.device.type == "cpu" and (dropout_p > 0 or grad_bias or hidden)
    if fused_enabled() and not need_weights and not cpu_math:
        if mask is None and bias is None:
            return sdpa(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
        attn_mask, dead = _merge_masks(mask, bias, causal, target, q.dtype, q.device)
        if attn_mask is not None and attn_mask.ndim < 4:  # SDPA's CPU kernels reject 1-D masks
            attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.ndim) + tuple(attn_mask.shape))
        out = sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
        return out if dead is None else out.masked_fill(dead, 0.0)
    return _attend_math(q, k, v, mask, bias, causal, dropout_p, scale, target, need_weights)


def _attend_math(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, causal: bool,
    dropout_p: float, scale: float, target: tuple[int, ...], need_weights: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    attn_mask, dead = _merge_masks(mask, bias, causal, target, compute_dtype, q.device)
    if attn_mask is not None and attn_mask.dtype != torch.bool and tuple(attn_mask.shape) == target:
        # a full-size additive term goes into the product itself: one pass over (L, S), not two
        scores = _scaled_scores(q.to(compute_dtype), k.to(compute_dtype), scale, attn_mask)  # (B, h, L, S)
    else:
        scores = _scaled_scores(q.to(compute_dtype), k.to(compute_dtype), scale)  # (B, h, L, S)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
    weights = scores.softmax(dim=-1)
    # neither the logits' (L, S) buffer nor a merged mask is needed past the softmax (autograd keeps
    # the softmax's output): free them before the product with v allocates
    del scores, attn_mask
    if dead is not None:
        weights = weights.masked_fill(dead, 0.0)
    weights = weights.to(q.dtype)
    # dropout and the product keep the noise but not the dropped map as well (torch's draws)
    out = dropout_product(weights, v, dropout_p) if dropout_p > 0 else weights @ v  # (B, h, L, e)
    return (out, weights) if need_weights else out


def _scaled_scores(q: Tensor, k: Tensor, scale: float, add: Tensor | None = None) -> Tensor:
    """`scale * q @ k^T (+ add)` in one product (baddbmm): autograd keeps q and k, no scaled copy.

    q `(..., L, d)`, k `(..., S, d)`, add `(..., L, S)` (the full output shape) -> `(..., L, S)`.
    """
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    n = math.prod(lead)  # not -1: an empty L or S leaves -1 undetermined
    q3 = q.expand(*lead, *q.shape[-2:]).reshape(n, *q.shape[-2:])  # (..., L, d) -> (N, L, d)
    k3 = k.expand(*lead, *k.shape[-2:]).reshape(n, *k.shape[-2:])  # (..., S, d) -> (N, S, d)
    if add is None:  # beta=0 ignores the 0-d input, which broadcasts without allocating (N, L, S)
        scores = torch.baddbmm(q.new_zeros(()), q3, k3.transpose(-2, -1), beta=0.0, alpha=scale)
    else:
        add3 = add.reshape(n, *add.shape[-2:])  # (..., L, S) -> (N, L, S)
        scores = torch.baddbmm(add3, q3, k3.transpose(-2, -1), alpha=scale)  # (N, L, S)
    return scores.reshape(*lead, q.shape[-2], k.shape[-2])
