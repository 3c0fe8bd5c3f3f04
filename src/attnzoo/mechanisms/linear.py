"""Linear attention, "Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention"
(Katharopoulos et al., 2020), arXiv:2006.16236.

The softmax kernel is replaced by the feature map $\\phi(x) = \\mathrm{elu}(x) + 1$, so the attention
factorises and runs in time and memory linear in the length: $(\\phi(Q)\\,(\\phi(K)^\\top V))$ instead of
$((\\phi(Q)\\phi(K)^\\top)\\,V)$.

- non-causal: one $d \\times d$ state $\\phi(K)^\\top V$ and one normaliser $\\sum_j \\phi(k_j)$ per head;
- causal: the paper's prefix sums, computed by chunks of `chunk_size` tokens (an exclusive cumulative
  sum of the per-chunk states, plus a masked product inside each chunk), so memory is
  $O(L d + (L / c) d^2 + L c)$ and no L x L matrix is built. Composite ops only: autograd, double
  backward and `torch.func` work (the paper's custom CUDA gradient is not needed for correctness).

Deviation: $\\varepsilon$ (`eps`) is added to the normaliser, as the authors' code does, so a query with
every key masked out gets a zero output instead of 0/0.

Shape letters: B batch, L length, C channels (`dim`), h heads, d = C / h, c chunk size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._checks import check_dropout, check_float, check_int, check_mask, check_shape
from attnzoo._registry import Example, FreeSize, register
from attnzoo.maps.capture import capturing, query_indices, record

__all__ = ["LinearAttention", "linear_attention"]


def _phi(x: Tensor) -> Tensor:
    return F.elu(x) + 1.0


def linear_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, eps: float = 1e-6,
    key_mask: Tensor | None = None, chunk_size: int = 128,
) -> Tensor:
    r"""Linear attention with $\phi = \mathrm{elu} + 1$ on heads `(B, h, L, d)`.

    $$
    o_i = \frac{\phi(q_i)^\top \sum_{j} \phi(k_j) v_j^\top}{\phi(q_i)^\top \sum_{j} \phi(k_j) + \varepsilon}
    $$

    with j over all keys, or over $j \le i$ when `causal`.

    Args:
        q: Queries `(B, h, L, d)`.
        k: Keys `(B, h, L, d)`.
        v: Values `(B, h, L, dv)`.
        causal: Query i attends to keys `0..i`. Default: False.
        eps: Added to the normaliser. Default: 1e-6.
        key_mask: Bool broadcastable to `(B, L)`, False for padding keys. Default: None.
        chunk_size: Tokens per chunk of the causal prefix sums. Default: 128.

    Returns:
        `(B, h, L, dv)`.
    """
    qf, kf = _phi(q), _phi(k)  # (B, h, L, d)
    if key_mask is not None:
        kf = kf * key_mask.to(kf.dtype)[..., None, :, None]  # (B, 1, L, 1): padding keys weigh 0
    if not causal:
        state = kf.transpose(-2, -1) @ v  # (B, h, d, dv)
        norm = kf.sum(-2)  # (B, h, d)
        return (qf @ state) / ((qf * norm[..., None, :]).sum(-1, keepdim=True) + eps)
    length = q.shape[-2]
    c = min(chunk_size, length)
    pad = (-length) % c
    if pad:  # zero keys and values at the end: causal, so no real query sees them
        qf, kf, v = (F.pad(t, (0, 0, 0, pad)) for t in (qf, kf, v))
    qc, kc, vc = (t.unflatten(-2, (-1, c)) for t in (qf, kf, v))  # (B, h, n, c, d) each
    states = kc.transpose(-2, -1) @ vc  # (B, h, n, d, dv) per chunk
    norms = kc.sum(-2)  # (B, h, n, d)
    # Exclusive prefix sums over chunks: what the earlier chunks contribute to each chunk.
    before = states.cumsum(2) - states  # (B, h, n, d, dv)
    norm_before = norms.cumsum(2) - norms  # (B, h, n, d)
    scores = qc @ kc.transpose(-2, -1)  # (B, h, n, c, c) inside each chunk
    scores = scores * torch.ones(c, c, dtype=torch.bool, device=q.device).tril()  # (c, c) causal
    num = qc @ before + scores @ vc  # (B, h, n, c, dv)
    den = (qc * norm_before[..., None, :]).sum(-1, keepdim=True) + scores.sum(-1, keepdim=True) + eps
    out = (num / den).flatten(-3, -2)  # (B, h, n, c, dv) -> (B, h, n*c, dv)
    return out[..., :length, :]


@register(
    "linear",
    family="linear",
    paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
    year=2020,
    layout="NLC",
    example=Example(
        kwargs={"dim": 8, "num_heads": 2},
        inputs=((2, 7, 8),),
        output=(2, 7, 8),
        channel_dim=-1,
        free_sizes=(FreeSize(((0, 1),), 1),),
    ),
    aliases=("linear_attention", "linear_transformer"),
)
class LinearAttention(nn.Module):
    r"""Multi-head linear self-attention with the feature map $\phi(x) = \mathrm{elu}(x) + 1$.

    $$
    o_i = W_o\,\mathrm{concat}_h\,\frac{\phi(q_i)^\top \sum_{j} \phi(k_j) v_j^\top}
    {\phi(q_i)^\top \sum_{j} \phi(k_j) + \varepsilon}
    $$

    per head, j over all (unmasked) keys, or $j \le i$ when `causal`. Time $O(B L C d)$, memory
    $O(B L C + B h d^2)$ non-causal and $O(B L C + B h (L/c) d^2 + B h L c)$ causal (chunks of c = 128
    tokens); no L x L matrix unless the weights are asked for.

    Args:
        dim: Width C of the tokens.
        num_heads: Number of heads h; must divide `dim`. Default: 8.
        qkv_bias: Give the query/key/value projection a bias. Default: True.
        causal: Query i attends only to keys `0..i` (the paper's autoregressive form). Default: False.
        eps: Added to the normaliser, > 0 (keeps fully masked queries at 0). Default: 1e-6.
        proj_drop: Dropout after the output projection (training only). Default: 0.0.
        device: Device of the parameters. Default: None.
        dtype: dtype of the parameters. Default: None.

    Shape:
        - x: `(B, L, C)`; key_mask: bool broadcastable to `(B, L)`, True = keep.
        - Output: `(B, L, C)`; with `need_weights=True` also the normalised weights `(B, h, L, L)`
          (the linear kernel's, built explicitly: $O(L^2)$ memory).

    Example:
        ```python
        >>> attn = LinearAttention(64, num_heads=4, causal=True)
        >>> x = torch.randn(2, 300, 64)
        >>> attn(x).shape
        torch.Size([2, 300, 64])
        >>> out, weights = attn(x[:, :10], need_weights=True)
        >>> weights.shape
        torch.Size([2, 4, 10, 10])

        ```
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        causal: bool = False,
        eps: float = 1e-6,
        proj_drop: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.dim = check_int(dim, "dim", who)
        self.num_heads = check_int(num_heads, "num_heads", who)
        if dim % num_heads != 0:
            raise ValueError(f"{who}: dim={dim} must be divisible by num_heads={num_heads}")
        self.head_dim = dim // num_heads
        self.causal = causal
        self.eps = check_float(eps, "eps", who, above=0.0)  # 0: a fully masked query gives 0 / 0
        if eps == float("inf"):
            raise ValueError(f"{who}: eps must be finite, got {eps}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = check_dropout(proj_drop, "proj_drop", who)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, causal={self.causal}, eps={self.eps}"

    def forward(
        self, x: Tensor, need_weights: bool = False, *, key_mask: Tensor | None = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend over the sequence; `(out, weights)` with `need_weights`.

        Args:
            x: Tokens `(B, L, C)`.
            need_weights: Also return the `(B, h, L, L)` weights. Default: False.
            key_mask: Bool broadcastable to `(B, L)`, False marks padding keys. Default: None.
        """
        who = type(self).__name__
        dims = check_shape(x, who, "B L C", "x", C=self.dim)
        batch, length = dims["B"], dims["L"]
        if key_mask is not None:
            if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool:
                got = key_mask.dtype if isinstance(key_mask, Tensor) else type(key_mask).__name__
                raise TypeError(f"{who} expects key_mask to be a bool tensor (True = keep), got {got}")
            key_mask = check_mask(key_mask, (batch, length), who, "key_mask").expand(batch, length)
        projected = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))  # (B, L, 3, h, d)
        # one head-major copy: on strided heads every product below would copy its operands again
        q, k, v = projected.permute(2, 0, 3, 1, 4).contiguous().unbind(0)  # (B, h, L, d) each
        del projected  # nothing saves it: freed now, not at the end of forward
        out = linear_attention(q, k, v, causal=self.causal, eps=self.eps, key_mask=key_mask)
        weights = None
        if need_weights:
            weights = self._weights(q, k, torch.arange(length, device=x.device), key_mask)  # (B, h, L, L)
        if capturing():  # rows of the capture's query points only
            idx = query_indices((length,), x.device)
            with torch.no_grad():
                rows = self._weights(q.index_select(2, idx), k, idx, key_mask)  # (B, h, Q, L)
            record(self, "rows", rows, grid=(length,), queries=idx, query_grid=(length,))
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(x.shape)))  # (B, h, L, d) -> (B, L, C)
        return (out, weights) if weights is not None else out

    def _weights(self, q: Tensor, k: Tensor, idx: Tensor, key_mask: Tensor | None) -> Tensor:
        """Normalised linear-kernel weights of the queries `idx` over every key, `(B, h, Q, L)`."""
        scores = _phi(q) @ _phi(k).transpose(-2, -1)  # (B, h, Q, L)
        if key_mask is not None:
            scores = scores * key_mask[:, None, None, :].to(scores.dtype)
        if self.causal:
            scores = scores * (torch.arange(k.shape[-2], device=k.device) <= idx[:, None])  # (Q, L)
        return scores / (scores.sum(-1, keepdim=True) + self.eps)
