"""Nested-tensor input for torch's ``nn.MultiheadAttention`` API, as torch's inference fast path takes it.

torch's ``TransformerEncoder(enable_nested_tensor=True)`` packs a padded batch into a nested tensor in
inference and, when its own fused layer does not run (a forward hook on ``self_attn``, for one), hands
that nested tensor to ``self_attn``. torch's class takes it for self-attention with ``batch_first=True``
and no mask; `attnzoo.compat.MultiheadAttention` does the same by padding: the nested sequences become
a padded batch whose padding is masked as keys, and the outputs are unpadded back into a nested tensor.

Shape letters: B batch, L longest sequence, E embedding.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

__all__ = ["nested_self_attention"]


class _Attention(Protocol):
    batch_first: bool

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = ...,
                need_weights: bool = ..., attn_mask: Tensor | None = ...,
                average_attn_weights: bool = ..., is_causal: bool = ...) -> tuple[Tensor, Tensor | None]: ...


def nested_self_attention(
    module: _Attention, who: str, query: Tensor, key: Tensor, value: Tensor, masks: tuple[Tensor | None, ...],
    need_weights: bool, average_attn_weights: bool, is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``module`` on a nested ``query`` (B sequences of ``(L_i, E)``) that is also ``key`` and ``value``.

    Returns:
        The output, nested as ``query`` is, and the weights ``(B, L, L)`` (``(B, h, L, L)`` without
        averaging) of the padded batch, zero in a padding query's row, or None: torch's fast path
        returns them padded too.
    """
    if key is not query or value is not query:
        raise TypeError(f"{who} takes a nested tensor for self-attention only (query, key and value the same "
                        f"tensor, as torch's fast path does); got different key or value")
    if not module.batch_first:
        raise TypeError(f"{who} takes a nested tensor only with batch_first=True (as torch's fast path does)")
    if any(mask is not None for mask in masks):
        raise TypeError(f"{who} takes no attn_mask or key_padding_mask with a nested tensor (its sequences' "
                        f"lengths are the padding mask); got a mask")
    if is_causal:  # as for a padded query: the hint needs the mask it describes
        raise ValueError(f"{who} expects attn_mask with is_causal=True (is_causal is a hint that attn_mask "
                         f"is the causal mask, as in torch), got a nested query and no attn_mask")
    if query.dim() != 3 or not query.is_floating_point():
        raise TypeError(f"{who} expects a nested query of B sequences (L_i, E) with a floating dtype, "
                        f"got {query.dim()}-D {query.dtype}")
    lengths = [t.shape[0] for t in query.unbind()]
    if not any(lengths):
        raise ValueError(f"{who} expects a nested query with at least one token, got {len(lengths)} empty "
                         f"sequences")
    try:
        padded = query.to_padded_tensor(0.0)  # (B, L, E)
    except RuntimeError as err:  # a jagged view with holes (from narrow): torch pads contiguous ones only
        raise TypeError(f"{who} cannot pad this nested query ({err}); pass a contiguous one "
                        f"(query.contiguous())") from None
    positions = torch.arange(padded.shape[1], device=padded.device)
    padding = positions[None] >= torch.tensor(lengths, device=padded.device)[:, None]  # (B, L), True = pad
    out, weights = module.forward(padded, padded, padded, key_padding_mask=padding, need_weights=need_weights,
                                  average_attn_weights=average_attn_weights)
    rows = [row[:n] for row, n in zip(out, lengths, strict=True)]  # B x (L_i, E)
    nested = torch.nested.as_nested_tensor(rows, layout=query.layout)
    if weights is not None:  # a padding query's row is zero, as torch's
        rows_out = padding[:, None, :, None] if weights.dim() == 4 else padding[..., None]
        weights = weights.masked_fill(rows_out, 0.0)
    return nested, weights
