"""torch's ``nn.MultiheadAttention``, run through `attnzoo.functional.attend`.

"Attention Is All You Need" (Vaswani et al., 2017), https://arxiv.org/abs/1706.03762, with the API of
``torch.nn.MultiheadAttention``: its constructor, parameters, ``state_dict`` keys (``strict=True`` both
ways), ``forward`` and mask conventions, so it works as ``self_attn`` / ``multihead_attn`` in torch's
transformer layers; ``attnzoo.capture_maps`` records it also under ``need_weights=False``.

Differences from torch's class:

- a query whose every key is masked gets a zero output and zero weights (torch gives NaN);
- with dropout in training mode the returned weights are the weights before dropout (torch returns
  them after dropout; the output uses the dropped weights in both);
- ``is_causal=True`` without ``attn_mask`` raises ``ValueError`` (torch raises ``RuntimeError``
  outside its inference fast path, and silently ignores ``is_causal`` on it);
- a nested tensor is taken for self-attention with ``batch_first=True`` and no mask, as on torch's
  inference fast path (`attnzoo.mechanisms._nested`), and also in training;
- bad shapes and dtypes raise ``ValueError`` / ``TypeError`` naming the argument before any work, and so
  does an empty input (torch returns an empty output).

Masks at this edge follow torch: a **boolean True means "may not attend"**, a float mask is added to
the logits; inside they are turned into `attend`'s convention (True = may attend).
"""

from __future__ import annotations

import warnings
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from attnzoo._checks import autocast_on, check_float, check_int
from attnzoo._registry import Example, register_compat
from attnzoo.functional import attend
from attnzoo.maps.capture import capturing, record_rows
from attnzoo.mechanisms._nested import nested_self_attention

__all__ = ["MultiheadAttention"]

_WHO = "MultiheadAttention"


def _check_mask_dtype(mask: object, name: str) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{_WHO} expects {name} to be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{_WHO} expects {name} of dtype torch.bool or a floating dtype, got {mask.dtype}")
    return mask


@register_compat(example=Example({"embed_dim": 8, "num_heads": 2, "batch_first": True},
                                 ((2, 5, 8), (2, 7, 8), (2, 7, 8)), (2, 5, 8), channel_dim=-1))
class MultiheadAttention(nn.Module):
    r"""Multi-head attention with the API of torch's ``nn.MultiheadAttention``, run by ``attend``.

    $$
    \mathrm{MultiHead}(Q, K, V) = \mathrm{Concat}(\mathrm{head}_1, \dots, \mathrm{head}_h) W^O, \quad
    \mathrm{head}_i = \mathrm{softmax}\left(\frac{Q W_i^Q (K W_i^K)^\top}{\sqrt{d}} + M\right) V W_i^V
    $$

    Args:
        embed_dim: Model width E.
        num_heads: Number of heads h; must divide ``embed_dim`` (head width d = E / h).
        dropout: Dropout on the attention weights in training mode. Default: 0.0.
        bias: Biases on the input and output projections. Default: True.
        add_bias_kv: Append a learnt key and value (``bias_k``, ``bias_v``) to every sequence. Default: False.
        add_zero_attn: Append a zero key and value (after splitting heads). Default: False.
        kdim: Width of ``key``. Default: ``embed_dim``.
        vdim: Width of ``value``. Default: ``embed_dim``.
        batch_first: Inputs and outputs are ``(B, L, E)`` instead of ``(L, B, E)``. Default: False.
        device: Device of the parameters. Default: None.
        dtype: Dtype of the parameters. Default: None.

    Shape:
        - query: ``(L, B, E)``, ``(B, L, E)`` with ``batch_first``, or ``(L, E)`` unbatched.
        - key: ``(S, B, kdim)``, ``(B, S, kdim)`` or ``(S, kdim)``; value likewise with ``vdim``.
        - key_padding_mask: ``(B, S)``, or ``(S,)`` unbatched.
        - attn_mask: ``(L, S)`` or ``(B*h, L, S)`` (``(h, L, S)`` unbatched).
        - Output: ``(output, weights)``, output shaped as query; weights ``(B, L, S)`` averaged over
          heads or ``(B, h, L, S)`` per head (no B when unbatched), None without ``need_weights``.
          S counts the appended ``bias_k`` / zero keys. A query with every key masked gets zero
          output and weights, where torch gives NaN (the module docstring lists every difference).

    Example:
        ```python
        >>> import torch
        >>> from attnzoo.compat import MultiheadAttention
        >>> mha = MultiheadAttention(16, 4, batch_first=True)
        >>> mha.load_state_dict(torch.nn.MultiheadAttention(16, 4, batch_first=True).state_dict())
        <All keys matched successfully>
        >>> x = torch.randn(2, 5, 16)
        >>> out, weights = mha(x, x, x)
        >>> out.shape, weights.shape
        (torch.Size([2, 5, 16]), torch.Size([2, 5, 5]))

        ```
    """

    __constants__ = ["batch_first"]
    takes_nested = True  # `attnzoo.mechanisms._nested`: a nested query passes the input checks

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_int(embed_dim, "embed_dim", _WHO)
        check_int(num_heads, "num_heads", _WHO)
        if embed_dim % num_heads:
            raise ValueError(f"{_WHO}: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        dropout = check_float(dropout, "dropout", _WHO, minimum=0.0, maximum=1.0)
        for width, name in ((kdim, "kdim"), (vdim, "vdim")):
            if width is not None:
                check_int(width, name, _WHO)
        super().__init__()

        def empty(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype))

        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads, self.dropout, self.batch_first = num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.add_zero_attn = add_zero_attn
        self.in_proj_weight: nn.Parameter | None
        self.q_proj_weight: nn.Parameter | None
        self.k_proj_weight: nn.Parameter | None
        self.v_proj_weight: nn.Parameter | None
        if self._qkv_same_embed_dim:
            self.in_proj_weight = empty(3 * embed_dim, embed_dim)
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.q_proj_weight = empty(embed_dim, embed_dim)
            self.k_proj_weight = empty(embed_dim, self.kdim)
            self.v_proj_weight = empty(embed_dim, self.vdim)
            self.register_parameter("in_proj_weight", None)
        self.in_proj_bias: nn.Parameter | None
        if bias:
            self.in_proj_bias = empty(3 * embed_dim)
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, device=device,
                                                        dtype=dtype)
        self.bias_k: nn.Parameter | None = empty(1, 1, embed_dim) if add_bias_kv else None
        self.bias_v: nn.Parameter | None = empty(1, 1, embed_dim) if add_bias_kv else None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """torch's initialisation: Xavier-uniform projections, zero biases, Xavier-normal ``bias_k/v``."""
        for weight in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if weight is not None:
                nn.init.xavier_uniform_(weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        for extra in (self.bias_k, self.bias_v):
            if extra is not None:
                nn.init.xavier_normal_(extra)

    reset_parameters = _reset_parameters  # public too: torch's deferred initialisation calls this name

    # -- checks ---------------------------------------------------------------------------------

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> bool:
        tensors = {"query": query, "key": key, "value": value}
        for name, t in tensors.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{_WHO} expects {name} to be a torch.Tensor, got {type(t).__name__}")
            if t.is_nested:
                raise TypeError(f"{_WHO} takes a nested tensor as query only (with key and value the same "
                                f"tensor); got a nested {name}")
            if not t.is_floating_point():
                raise TypeError(f"{_WHO} expects {name} to have a floating dtype, got {t.dtype}")
            if t.numel() == 0:
                raise ValueError(f"{_WHO} expects a non-empty {name}, got {tuple(t.shape)}")
        if query.ndim not in (2, 3):
            raise ValueError(
                f"{_WHO} expects query of shape (L, B, E), (B, L, E) or unbatched (L, E), "
                f"got {tuple(query.shape)}"
            )
        if key.ndim != query.ndim or value.ndim != query.ndim:
            raise ValueError(
                f"{_WHO} expects key and value with as many dimensions as query ({query.ndim}-D), "
                f"got key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        if not query.dtype == key.dtype == value.dtype:
            raise TypeError(
                f"{_WHO} expects query, key, value of one dtype, "
                f"got {query.dtype}, {key.dtype}, {value.dtype}"
            )
        weight = self.out_proj.weight
        if query.dtype != weight.dtype and not autocast_on(query.device.type):
            raise TypeError(f"{_WHO} expects query of the parameters' dtype {weight.dtype}, "
                            f"got {query.dtype}")
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim),
                               ("value", value, self.vdim)):
            if t.shape[-1] != width:
                arg = {"query": "embed_dim", "key": "kdim", "value": "vdim"}[name]
                raise ValueError(
                    f"{_WHO} expects {name} with last dimension {arg}={width}, got {tuple(t.shape)}"
                )
        batched = query.ndim == 3
        b_axis = 0 if self.batch_first or not batched else 1
        if batched and not query.shape[b_axis] == key.shape[b_axis] == value.shape[b_axis]:
            raise ValueError(
                f"{_WHO} expects query, key, value of one batch size (batch_first={self.batch_first}), "
                f"got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        s_axis = 1 - b_axis if batched else 0
        if key.shape[s_axis] != value.shape[s_axis]:
            raise ValueError(
                f"{_WHO} expects key and value of one length S, got {tuple(key.shape)}, {tuple(value.shape)}"
            )
        return batched

    def _check_masks(
        self, key_padding_mask: object, attn_mask: object, batch: int, length_q: int, length_k: int,
        batched: bool,
    ) -> None:
        if key_padding_mask is not None:
            kpm = _check_mask_dtype(key_padding_mask, "key_padding_mask")
            want: tuple[int, ...] = (batch, length_k) if batched else (length_k,)
            if tuple(kpm.shape) != want:
                raise ValueError(
                    f"{_WHO} expects key_padding_mask of shape {want} (B, S), got {tuple(kpm.shape)}"
                )
        if attn_mask is not None:
            mask = _check_mask_dtype(attn_mask, "attn_mask")
            heads = batch * self.num_heads if batched else self.num_heads
            shapes = ((length_q, length_k), (heads, length_q, length_k))
            if tuple(mask.shape) not in shapes:
                raise ValueError(
                    f"{_WHO} expects attn_mask of shape (L, S) = {shapes[0]} or (B*num_heads, L, S) = "
                    f"{shapes[1]}, got {tuple(mask.shape)}"
                )
        if (
            isinstance(key_padding_mask, Tensor) and isinstance(attn_mask, Tensor)
            and key_padding_mask.dtype != attn_mask.dtype
        ):
            warnings.warn(
                "Support for mismatched key_padding_mask and attn_mask is deprecated. "
                "Use same type for both instead.",
                stacklevel=3,
            )

    # -- pieces ---------------------------------------------------------------------------------

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, L, E)``, ``(B, S, kdim)``, ``(B, S, vdim)`` -> q ``(B, h, L, d)``, k, v ``(B, h, S', d)``."""
        batch, e = query.shape[0], self.embed_dim
        bias = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        if self.in_proj_weight is not None and query is key and key is value:
            q, k, v = F.linear(query, self.in_proj_weight, bias).chunk(3, dim=-1)  # (B, L, E) each
        else:
            if self.in_proj_weight is not None:
                w_q, w_k, w_v = self.in_proj_weight.chunk(3)
            else:  # kdim or vdim differ from embed_dim: three separate weights
                w_q, w_k, w_v = cast(tuple[Tensor, Tensor, Tensor],
                                     (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight))
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, e).to(k.dtype)], dim=1)  # (B, S+1, E)
            v = torch.cat([v, self.bias_v.expand(batch, 1, e).to(v.dtype)], dim=1)  # (B, S+1, E)
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            zeros = k.new_zeros(batch, self.num_heads, 1, self.head_dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)  # (B, h, S'+1, d)
        return q, k, v  # (B, h, L, d), (B, h, S', d), (B, h, S', d)

    def _mask_for_attend(
        self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, batch: int, batched: bool,
        extra: int, dtype: torch.dtype,
    ) -> Tensor | None:
        """torch's masks (True = blocked, or additive) -> one mask for ``attend`` (True = may attend)."""
        terms = []
        if attn_mask is not None:
            if attn_mask.ndim == 2:
                terms.append(attn_mask[None, None])  # (L, S) -> (1, 1, L, S)
            elif batched:
                terms.append(attn_mask.unflatten(0, (batch, self.num_heads)))  # (B*h, L, S) -> (B, h, L, S)
            else:
                terms.append(attn_mask[None])  # (h, L, S) -> (1, h, L, S)
        if key_padding_mask is not None:
            terms.append(key_padding_mask.reshape(batch, 1, 1, -1))  # (B, S) or (S,) -> (B, 1, 1, S)
        if not terms:
            return None
        if all(t.dtype == torch.bool for t in terms):
            keep = ~terms[0] if len(terms) == 1 else ~(terms[0] | terms[1])
            return F.pad(keep, (0, extra), value=True) if extra else keep  # appended keys are open
        floats = [t.to(dtype) if t.is_floating_point() else
                  torch.zeros_like(t, dtype=dtype).masked_fill(t, -torch.inf) for t in terms]
        additive = floats[0] if len(floats) == 1 else floats[0] + floats[1]  # (B, h, L, S) broadcast
        return F.pad(additive, (0, extra), value=0.0) if extra else additive

    # -- forward --------------------------------------------------------------------------------

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` to ``key``/``value``, as torch's ``nn.MultiheadAttention.forward``.

        Args:
            query: Queries, see Shape in the class docstring.
            key: Keys.
            value: Values.
            key_padding_mask: Bool (True = padding, ignored) or float (added) per key. Default: None.
            need_weights: Also return the attention weights (runs the math path). Default: True.
            attn_mask: Bool (True = may **not** attend) or float (added to the logits). Default: None.
            average_attn_weights: Average the returned weights over heads. Default: True.
            is_causal: A hint that ``attn_mask`` is the causal mask; as in torch it needs
                ``attn_mask``, and without ``key_padding_mask`` and ``need_weights`` the causal mask
                is applied in place of ``attn_mask``. Default: False.

        Returns:
            ``(output, weights)``; weights is None unless ``need_weights``.
        """
        if isinstance(query, Tensor) and query.is_nested:  # as torch's fast path: `_nested`
            return nested_self_attention(self, _WHO, query, key, value, (key_padding_mask, attn_mask),
                                         bool(need_weights), bool(average_attn_weights), bool(is_causal))
        batched = self._check_inputs(query, key, value)
        if is_causal and attn_mask is None:
            raise ValueError(
                f"{_WHO} expects attn_mask with is_causal=True (is_causal is a hint that attn_mask is the "
                f"causal mask, as in torch), got attn_mask=None"
            )
        if not batched:
            query, key, value = query[None], key[None], value[None]  # (L, E) -> (1, L, E)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # (L, B, E) -> (B, L, E)
        batch, length_q, length_k = query.shape[0], query.shape[1], key.shape[1]
        self._check_masks(key_padding_mask, attn_mask, batch, length_q, length_k, batched)
        q, k, v = self._project(query, key, value)
        need = bool(need_weights)  # torch takes any truthy value for its switches; attend takes bools
        causal = bool(is_causal) and key_padding_mask is None and not need
        extra = k.shape[2] - length_k  # appended bias_k / zero keys
        mask = self._mask_for_attend(
            None if causal else attn_mask, key_padding_mask, batch, batched, extra, q.dtype
        )
        dropout_p = self.dropout if self.training else 0.0
        result = attend(q, k, v, mask=mask, causal=causal, dropout_p=dropout_p, need_weights=need)
        out, weights = result if isinstance(result, tuple) else (result, None)
        if capturing():  # map capture: rows of the capture's query points, also without need_weights
            record_rows(self, q, k, grid=(length_q,), key_grid=(k.shape[2],), mask=mask, causal=causal)
        out = self.out_proj(out.permute(2, 0, 1, 3).flatten(2))  # (L, B, E): torch's layout, a dropout's mask
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)  # (B, h, L, S') -> (B, L, S')
        if not batched:
            out = out[:, 0]  # (L, 1, E) -> (L, E)
            weights = None if weights is None else weights[0]
        elif self.batch_first:
            out = out.transpose(0, 1)  # (L, B, E) -> (B, L, E), a view as torch's
        return out, weights

    def merge_masks(
        self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, query: Tensor
    ) -> tuple[Tensor | None, int | None]:
        """torch's helper for its fused encoder-layer kernel (``nn.TransformerEncoderLayer`` calls it).

        Returns ``(mask, mask_type)``: the padding mask alone (type 1), or the attention mask expanded
        to ``(B, h, L, L)`` and combined with the padding mask (type 2); ``(None, None)`` without masks.
        Masks keep torch's convention (True or -inf = blocked).
        """
        if attn_mask is None:
            return (key_padding_mask, 1) if key_padding_mask is not None else (None, None)
        batch, length = query.shape[0], query.shape[1]
        if attn_mask.ndim == 3:
            merged = attn_mask.view(batch, -1, length, length)  # (B*h, L, L) -> (B, h, L, L)
        else:
            merged = attn_mask.view(1, 1, length, length).expand(batch, self.num_heads, -1, -1)  # (B,h,L,L)
        if key_padding_mask is not None:
            keys = key_padding_mask.view(batch, 1, 1, length).expand(-1, self.num_heads, -1, -1)  # (B,h,1,L)
            merged = merged | keys if merged.dtype == keys.dtype == torch.bool else merged + keys
        return merged, 2

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"kdim={self.kdim}, vdim={self.vdim}, batch_first={self.batch_first}")
