"""``scaled_dot_product_attention`` with a double backward on CPU, at the speed of the fused kernel.

On CPU, SDPA's flash kernel has a backward (``_scaled_dot_product_flash_attention_for_cpu_backward``)
without a derivative of its own, so a gradient penalty or ``gradgradcheck`` through it fails.
`sdpa` runs the same flash forward and backward ops through `_FlashCPU`, whose backward calls
the fused backward op for first order and, under ``create_graph=True``, differentiates SDPA's math
decomposition (``aten._scaled_dot_product_attention_math``) instead. Under forward-mode AD and under
a ``torch.func`` grad transform (whose backward may be differentiated again: ``grad(grad(f))``, or
autograd over an inner ``torch.func.grad`` as in MAML) it runs that decomposition directly. Everywhere
else (another device, a choice of the math backend, ``vmap`` alone, ``torch.compile``) it is
``F.scaled_dot_product_attention`` itself.

Shape letters: B batch, h heads, L query length, S key length, d head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend

from attnzoo.kernels.route import (
    composite_required,
    forward_ad_active,
    grad_transform_active,
    large_logits,
    recompute_grads,
    rowwise_grads,
)

__all__ = ["sdpa"]

_FLASH: int = SDPBackend.FLASH_ATTENTION.value


def _register_flop_formulas() -> None:
    """Give SDPA's CPU flash ops torch's own SDPA FLOP formulas.

    torch 2.14's ``FlopCounterMode`` has formulas for the CUDA attention kernels only, so on CPU the
    attention that `sdpa` runs (the fused path of every mechanism) counted 0 FLOPs, and a model
    looked cheaper on the fused path than on the math path. Forward: the two products; backward: five
    (the logits are recomputed, as the kernel does). A formula torch (a later release) or the user
    registered already is kept.
    """
    from torch.utils import flop_counter

    def forward(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return int(flop_counter.sdpa_flop_count(q, k, v))

    def backward(grad: Any, q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return int(flop_counter.sdpa_backward_flop_count(grad, q, k, v))

    aten = torch.ops.aten
    for op, formula in ((aten._scaled_dot_product_flash_attention_for_cpu, forward),
                        (aten._scaled_dot_product_flash_attention_for_cpu_backward, backward)):
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op)(formula)


_register_flop_formulas()


def _math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float | None) -> Tensor:
    """SDPA's own math decomposition (plain differentiable ops)."""
    return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, mask, 0.0, causal, None, scale=scale)[0]


def _rows(mask: Tensor | None, causal: bool, scale: float | None) -> Callable[..., Tensor]:
    """`_math` on query rows `start:stop` (`route.rowwise_grads`): the mask's rows, causality as a mask."""

    def run(q: Tensor, k: Tensor, v: Tensor, start: int, stop: int) -> Tensor:
        rows = None if mask is None else mask[..., start:stop, :] if mask.shape[-2] > 1 else mask
        if causal:  # top-left aligned: query start + i sees keys 0..start + i
            late = torch.ones(stop - start, k.shape[-2], dtype=torch.bool, device=q.device).triu_(start + 1)
            bias = torch.zeros(late.shape, dtype=q.dtype, device=q.device).masked_fill_(late, float("-inf"))
            rows = bias if rows is None else rows + bias
        return _math(q, k, v, rows, False, scale)

    return run


class _FlashCPU(torch.autograd.Function):
    """The CPU flash kernel, forward and first-order backward; double backward by the math path."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float | None
    ) -> Tensor:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale
        )  # (B, h, L, e), (B, h, L)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, v, mask, out, lse = ctx.saved_tensors
        causal, scale, needs = ctx.causal, ctx.scale, ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiate the math path instead
            plain = lambda a, b, c: _math(a, b, c, mask, causal, scale)  # noqa: E731
            grads = recompute_grads(plain, [q, k, v], grad, needs[:3])
            return (*grads, None, None, None)
        if large_logits(lse):  # exp(logit - lse) would be off: a fresh softmax per block of rows
            return (*rowwise_grads(_rows(mask, causal, scale), q, k, v, grad, needs), None, None, None)
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
        )
        grads = (gq if needs[0] else None, gk if needs[1] else None, gv if needs[2] else None)
        return (*grads, None, None, None)


def sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """``F.scaled_dot_product_attention`` whose CPU flash path also has a double backward.

    Args:
        q: Queries.
        k: Keys.
        v: Values.
        attn_mask: Bool (True = may attend) or additive float mask, broadcastable to ``(B, h, L, S)``.
            Default: None.
        dropout_p: Dropout on the attention weights (SDPA takes its math path on CPU when
            positive). Default: 0.0.
        is_causal: Causal attention (top-left aligned). Default: False.
        scale: Multiplies the logits. Default: ``1 / sqrt(d)``.

    Returns:
        The output ``(B, h, L, e)``, equal to ``F.scaled_dot_product_attention``'s.

    Shape:
        - q: ``(B, h, L, d)``; k: ``(B, h, S, d)``; v: ``(B, h, S, e)``.
    """
    # the fused kernels have no forward derivative nor a differentiable backward; the decomposition has
    if forward_ad_active() or grad_transform_active():
        return torch.ops.aten._scaled_dot_product_attention_math(
            q, k, v, _additive(attn_mask, q), dropout_p, is_causal, None, scale=scale
        )[0]
    if (
        q.device.type == "cpu"
        and dropout_p == 0.0
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
        and (attn_mask is None or not attn_mask.requires_grad)
        and not composite_required()
        and torch._fused_sdp_choice(q, k, v, attn_mask, 0.0, is_causal, scale=scale) == _FLASH
    ):
        return _FlashCPU.apply(q, k, v, _additive(attn_mask, q), is_causal, scale)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )


def _additive(mask: Tensor | None, q: Tensor) -> Tensor | None:
    """A bool mask (True = may attend) as the additive float mask SDPA makes of it before its kernels;
    the ops called here directly take a bool mask otherwise (the math op would add it as 0 / 1)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
