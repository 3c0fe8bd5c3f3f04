"""attnzoo.convert.torch: what `from_torch` / `replace(model, nn.MultiheadAttention)` carry over besides
the weights (outputs and masks: tests/mechanisms/test_torch_mha.py)."""

from __future__ import annotations

import torch
from torch import nn

import attnzoo
from attnzoo.compat import MultiheadAttention

E, H = 8, 2


def test_hooks_move_with_their_handles_and_out_proj_keeps_its_own():
    """Forward, backward and state_dict hooks registered before `replace` fire after it (also those on
    `self_attn.out_proj`), and the handles returned before it still remove them."""
    layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True, dtype=torch.float64)
    model = nn.Sequential(layer)
    attn = model[0].self_attn
    seen: list[str] = []
    handles = [
        attn.register_forward_hook(lambda m, args, out: seen.append("forward")),
        attn.register_forward_pre_hook(lambda m, args, kwargs: seen.append("pre"), with_kwargs=True),
        attn.register_full_backward_hook(lambda m, grad_in, grad_out: seen.append("backward")),
        attn.out_proj.register_forward_hook(lambda m, args, out: seen.append("out_proj")),
        attn.register_state_dict_post_hook(lambda m, state, prefix, meta: seen.append("state_dict")),
    ]
    assert attnzoo.replace(model, nn.MultiheadAttention) == ["0.self_attn"]
    assert type(model[0].self_attn) is MultiheadAttention
    x = torch.randn(2, 5, E, dtype=torch.float64, requires_grad=True)
    model(x).sum().backward()
    model.state_dict()
    assert sorted(seen) == ["backward", "forward", "out_proj", "pre", "state_dict"]
    for handle in handles:
        handle.remove()
    seen.clear()
    model(x).sum().backward()
    model.state_dict()
    assert seen == []
