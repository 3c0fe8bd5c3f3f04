"""torch -> attnzoo: ``nn.MultiheadAttention`` -> `attnzoo.compat.MultiheadAttention`.

The converted module holds the very same ``Parameter`` objects (so an optimizer built before the
conversion keeps training them, and ``state_dict`` keys are unchanged); ``copy.deepcopy`` the torch
module first for an independent copy. Its hooks (forward, backward, state_dict) move along, shared
with the torch module, so their handles still remove them.
"""

from __future__ import annotations

import functools

from torch import nn

from attnzoo.convert._source_keys import share_hooks
from attnzoo.convert._timm_common import refuse
from attnzoo.mechanisms.torch_mha import MultiheadAttention

__all__ = ["from_torch"]

_PARAMETERS = {
    "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
    "bias_k", "bias_v", "out_proj.weight", "out_proj.bias",
}


_refuse = functools.partial(refuse, who="from_torch")


def _check_representable(module: nn.MultiheadAttention) -> None:
    if type(module).forward is not nn.MultiheadAttention.forward:
        raise _refuse(module, "it overrides forward, which attnzoo's MultiheadAttention cannot reproduce")
    names = {name for name, _ in module.named_parameters(recurse=True)}
    extra = sorted(names - _PARAMETERS)
    if extra:
        raise _refuse(module, f"it has parameters torch's class does not have: {extra}")
    buffers = [name for name, _ in module.named_buffers()]
    if buffers:
        raise _refuse(module, f"it has buffers torch's class does not have: {buffers}")
    children = [name for name, _ in module.named_children() if name != "out_proj"]
    if children:
        raise _refuse(module, f"it has sub-modules torch's class does not have: {children}")
    out_proj = module.out_proj
    if not isinstance(out_proj, nn.Linear) or type(out_proj).forward is not nn.Linear.forward:
        raise _refuse(module, f"its out_proj is a {type(out_proj).__qualname__}, not a plain nn.Linear")
    if (module.in_proj_bias is None) != (out_proj.bias is None):
        raise _refuse(module, "in_proj_bias and out_proj.bias must both be present or both be None")
    if (module.bias_k is None) != (module.bias_v is None):
        raise _refuse(module, "bias_k and bias_v must both be present or both be None")
    same = getattr(module, "_qkv_same_embed_dim", True)
    if same != (module.in_proj_weight is not None):
        raise _refuse(module, "in_proj_weight must be present exactly when kdim == vdim == embed_dim")


def from_torch(module: nn.Module) -> MultiheadAttention:
    """``nn.MultiheadAttention`` -> ``attnzoo.compat.MultiheadAttention`` with the same weights.

    The result has the same configuration, shares the module's ``Parameter`` objects (same values,
    device, dtype and ``requires_grad``) and hook tables, keeps its training flag, and gives the same
    output (up to rounding; fully masked rows give zeros where torch gives NaN).

    Args:
        module: A ``torch.nn.MultiheadAttention``.

    Returns:
        The attnzoo module.

    Raises:
        TypeError: ``module`` is not an ``nn.MultiheadAttention``, or one attnzoo cannot represent
            (a subclass that overrides ``forward``, extra parameters or sub-modules, a replaced
            ``out_proj``); the message names the class and the reason.

    Example:
        ```python
        >>> import torch
        >>> from attnzoo.convert import from_torch
        >>> theirs = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        >>> ours = from_torch(theirs)
        >>> x = torch.randn(2, 5, 16)
        >>> torch.allclose(ours(x, x, x)[0], theirs(x, x, x)[0], atol=1e-6)
        True

        ```
    """
    if not isinstance(module, nn.MultiheadAttention):
        raise TypeError(f"from_torch expects a torch.nn.MultiheadAttention, got {type(module).__qualname__}")
    _check_representable(module)
    weight = module.out_proj.weight
    new = MultiheadAttention(
        module.embed_dim,
        module.num_heads,
        dropout=module.dropout,
        bias=module.in_proj_bias is not None,
        add_bias_kv=module.bias_k is not None,
        add_zero_attn=module.add_zero_attn,
        kdim=module.kdim,
        vdim=module.vdim,
        batch_first=module.batch_first,
        device="meta",  # allocates nothing: every parameter is replaced by the module's own below
        dtype=weight.dtype,
    )
    for name, param in module.named_parameters(recurse=False):
        setattr(new, name, param)
    new.out_proj = module.out_proj  # the very Linear: its parameters, training flag and hooks
    new.training = module.training
    share_hooks(module, new)  # handles registered on the torch module keep working
    return new
