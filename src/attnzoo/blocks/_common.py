"""What the prefix-named blocks of `attnzoo.blocks.transformer` share: names, checks, the residual `Add`."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo._checks import check_float, check_int, check_shape

__all__ = ["Add", "check_prefix", "check_input_shape", "keras_block_kwargs"]

_MHA_KWARGS = ("num_heads", "key_dim", "value_dim", "dropout", "use_bias", "output_shape")


def check_prefix(prefix: object, who: str) -> str:
    """`prefix` must make every layer name a Python identifier: letters, digits, `_`, no leading digit."""
    if not isinstance(prefix, str):
        raise TypeError(f"{who}: prefix must be a str, got {type(prefix).__name__} {prefix!r}")
    if not (prefix.isascii() and prefix.isidentifier()):
        raise ValueError(
            f"{who}: prefix must be an identifier fragment (ASCII letters, digits and '_', not starting "
            f"with a digit) such as 'att' or 'enc0', got {prefix!r}"
        )
    return prefix


def _positive_int(value: object) -> int | None:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) > 0:
        return int(value)
    return None


def check_input_shape(shape: object, who: str, name: str = "input_shape") -> tuple[int | None, int]:
    """A Keras `Input` shape without the batch: `(L, D)` with `L` an int or None. Returns it."""
    if isinstance(shape, (tuple, list)) and len(shape) == 2:
        length, dim = (None if shape[0] is None else _positive_int(shape[0])), _positive_int(shape[1])
        if dim is not None and (length is not None or shape[0] is None):
            return length, dim
    raise ValueError(f"{who} expects {name} = (L, D) with positive ints (L may be None), got {shape!r}")


class Add(nn.Module):
    """Keras's `Add` layer: the element-wise sum of its inputs (here, the residual connection)."""

    def forward(self, *xs: Tensor) -> Tensor:
        """Sum of the inputs (Keras `Add`); they must have the same shape: `(B, L, D)` each."""
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


def _check_bool(value: object, name: str, who: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{who}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return value


class _PrefixedBlock(nn.Module):
    """Sub-modules live under `f"{prefix}_{role}"`; `model_name` is the Keras model's name."""

    dim: int
    seq_len: int | None
    prefix: str
    model_name: str
    layer_names: tuple[str, ...]

    def _setup(self, prefix: object, seq_len: int | None, model_suffix: str, names: Sequence[str]) -> str:
        who = type(self).__name__
        self.prefix = check_prefix(prefix, who)
        self.seq_len = None if seq_len is None else check_int(seq_len, "seq_len", who)
        self.model_name = f"{self.prefix}_{model_suffix}"
        self.layer_names = tuple(f"{self.prefix}_{n}" for n in names)  # the Keras model's layers, in order
        return who

    def _role(self, role: str) -> nn.Module:
        return self._modules[f"{self.prefix}_{role}"]  # type: ignore[return-value]

    def _check_x(self, x: Tensor) -> None:
        if self.seq_len is None:
            check_shape(x, type(self).__name__, "B L D", D=self.dim)
        else:
            check_shape(x, type(self).__name__, "B L D", L=self.seq_len, D=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, model_name={self.model_name!r}"


_Device = torch.device | str | None


def _layer_norm(dim: int, eps: float, who: str, device: _Device, dtype: torch.dtype | None) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=check_float(eps, "eps", who, above=0.0), device=device, dtype=dtype)


def _check_mha_kwargs(kwargs: dict[str, Any], who: str) -> None:
    unknown = sorted(set(kwargs) - set(_MHA_KWARGS))
    if unknown:
        raise TypeError(
            f"{who} got unexpected keyword arguments {unknown}; it passes on only the "
            f"MultiHeadAttention arguments {list(_MHA_KWARGS)}"
        )
    missing = [k for k in ("num_heads", "key_dim") if k not in kwargs]
    if missing:
        raise TypeError(f"{who} requires {missing} (as keras.layers.MultiHeadAttention)")


def keras_block_kwargs(kwargs: dict[str, Any], dim: int, who: str) -> dict[str, Any]:
    """Keras `MultiHeadAttention` arguments as the block classes' (see the module docstring's table).

    `output_shape` must be None, D or `(D,)`: the residual `Add` needs the input's feature size D.
    """
    names = {"num_heads": "num_heads", "key_dim": "head_dim", "value_dim": "value_head_dim",
             "dropout": "attn_drop", "use_bias": "bias"}
    out = {names[k]: v for k, v in kwargs.items() if k in names}
    shape = kwargs.get("output_shape")
    if shape is not None:
        given = (shape,) if isinstance(shape, int) else tuple(shape)
        if given != (dim,):
            raise ValueError(
                f"{who}: the residual Add needs output_shape = ({dim},) (the input's feature size), "
                f"got {given}"
            )
    return out
