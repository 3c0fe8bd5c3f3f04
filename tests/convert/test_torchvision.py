"""torchvision's Swin attention (V1, V2) against attnzoo.compat's classes and from_torchvision: module
parity on padded, shifted and small maps (float64, 1e-10), whole swin_t / swin_v2_t swapped by
attnzoo.replace with the same logits, maps recorded, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo import compat
from attnzoo.convert import convert, converter_for, from_torchvision, known

tv = pytest.importorskip("torchvision.models.swin_transformer", reason="torchvision is not installed")
import torchvision  # noqa: E402

F64 = dict(atol=1e-10, rtol=1e-10)
PAIRS = [(tv.ShiftedWindowAttention, compat.ShiftedWindowAttention),
         (tv.ShiftedWindowAttentionV2, compat.ShiftedWindowAttentionV2)]
IDS = ["v1", "v2"]
CASES = [  # (window, shift, H, W)
    ([4, 4], [2, 2], 8, 8),  # shift on, no padding
    ([4, 4], [2, 2], 7, 9),  # shift on, padded tokens take part
    ([4, 3], [2, 1], 9, 5),  # rectangular
    ([4, 4], [2, 2], 4, 9),  # one window along H: shift dropped there only
    ([7, 7], [3, 3], 5, 5),  # map smaller than the window: padded, no shift
    ([3, 5], [0, 0], 7, 11),  # W-MSA, padded
]


def theirs_random(cls, window, shift, dim=16, heads=4, **kw):
    module = cls(dim, window, shift, heads, **kw).double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0, 0.5)
            if name == "logit_scale":
                p.uniform_(0.5, 5.0)  # some heads clamped at log(100)
    return module


@pytest.mark.parametrize("theirs_cls, ours_cls", PAIRS, ids=IDS)
@pytest.mark.parametrize("window, shift, height, width", CASES)
@pytest.mark.parametrize("train", [False, True])
def test_compat_reproduces_torchvision(theirs_cls, ours_cls, window, shift, height, width, train):
    torch.manual_seed(0)
    theirs = theirs_random(theirs_cls, window, shift).train(train)
    ours = ours_cls(16, window, shift, 4, dtype=torch.float64).train(train)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, height, width, 16, dtype=torch.float64, requires_grad=True)
    y_theirs, y_ours = theirs(x), ours(x)
    torch.testing.assert_close(y_ours, y_theirs, **F64)
    g_theirs, = torch.autograd.grad(y_theirs.square().sum(), x)
    g_ours, = torch.autograd.grad(y_ours.square().sum(), x)
    torch.testing.assert_close(g_ours, g_theirs, **F64)
    torch.testing.assert_close(ours.get_relative_position_bias(), theirs.get_relative_position_bias(), **F64)


@pytest.mark.parametrize("theirs_cls, ours_cls", PAIRS, ids=IDS)
def test_state_dict_loads_both_ways_and_options(theirs_cls, ours_cls):
    options = dict(qkv_bias=False, proj_bias=False, attention_dropout=0.1, dropout=0.2)
    theirs = theirs_cls(8, [3, 3], [1, 1], 2, **options)
    ours = ours_cls(8, [3, 3], [1, 1], 2, **options)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert (ours.window_size, ours.shift_size, ours.num_heads) == ([3, 3], [1, 1], 2)
    assert (ours.attention_dropout, ours.dropout) == (0.1, 0.2)
    assert ours.relative_position_index.shape == (81,)  # flat, as torchvision's


def test_v2_fresh_module_zeroes_the_key_bias_and_keeps_it_zero_in_forward():
    ours = compat.ShiftedWindowAttentionV2(8, [4, 4], [2, 2], 2)
    assert (ours.qkv.bias[8:16] == 0).all()
    with torch.no_grad():
        ours.qkv.bias.normal_()
    theirs = tv.ShiftedWindowAttentionV2(8, [4, 4], [2, 2], 2)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, 8, 8, 8)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("theirs_cls, ours_cls", PAIRS, ids=IDS)
def test_from_torchvision_shares_the_tensors(theirs_cls, ours_cls):
    torch.manual_seed(1)
    theirs = theirs_random(theirs_cls, [4, 4], [2, 2]).eval()
    hook_calls = []
    theirs.register_forward_hook(lambda *args: hook_calls.append(1))
    ours = from_torchvision(theirs)
    assert type(ours) is ours_cls and not ours.training
    assert converter_for(theirs) is from_torchvision and type(convert(theirs)) is ours_cls
    for (name, p), (name2, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert name == name2 and p is q
    for name, b in theirs.named_buffers():
        assert ours.get_buffer(name) is b
    x = torch.randn(1, 7, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), **F64)
    assert len(hook_calls) == 2


def test_replace_keeps_backward_hooks_and_the_handles_of_every_hook():
    block = nn.Sequential(tv.ShiftedWindowAttention(8, [2, 2], [1, 1], 2).double())
    seen: list[str] = []
    handles = [block[0].register_forward_hook(lambda *args: seen.append("forward")),
               block[0].register_full_backward_hook(lambda *args: seen.append("backward"))]
    attnzoo.replace(block, tv.ShiftedWindowAttention)
    assert type(block[0]) is compat.ShiftedWindowAttention
    x = torch.randn(1, 4, 4, 8, dtype=torch.float64, requires_grad=True)
    block(x).sum().backward()
    assert seen == ["forward", "backward"]
    for handle in handles:
        handle.remove()
    block(x).sum().backward()
    assert seen == ["forward", "backward"]  # removed by the handles taken before the swap


def test_known_and_refusals():
    assert "torchvision.models.swin_transformer.ShiftedWindowAttentionV2" in known()

    class Custom(tv.ShiftedWindowAttention):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="Custom: it overrides forward"):
        from_torchvision(Custom(8, [2, 2], [1, 1], 2))
    replaced = tv.ShiftedWindowAttention(8, [2, 2], [1, 1], 2)
    replaced.proj = type("MyLinear", (nn.Linear,), {})(8, 8)
    with pytest.raises(TypeError, match="its proj is a MyLinear, not a plain nn.Linear"):
        from_torchvision(replaced)
    extra = tv.ShiftedWindowAttention(8, [2, 2], [1, 1], 2)
    extra.gate = nn.Linear(8, 8)
    with pytest.raises(TypeError, match="state_dict keys"):
        from_torchvision(extra)
    with pytest.raises(TypeError, match="expects torchvision's ShiftedWindowAttention"):
        from_torchvision(nn.Linear(2, 2))
    model = nn.Sequential(tv.ShiftedWindowAttention(8, [2, 2], [1, 1], 2), replaced)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="replace: 1: "):
        attnzoo.replace(model, tv.ShiftedWindowAttention)
    assert type(model[0]) is tv.ShiftedWindowAttention  # untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("build, cls, ours_cls", [
    (torchvision.models.swin_t, tv.ShiftedWindowAttention, compat.ShiftedWindowAttention),
    (torchvision.models.swin_v2_t, tv.ShiftedWindowAttentionV2, compat.ShiftedWindowAttentionV2),
], ids=IDS)
def test_whole_model_keeps_its_logits_and_opens_the_maps(build, cls, ours_cls):
    torch.manual_seed(2)
    model = build(weights=None).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)  # stages of 16, 8, 4, 2: padded, shift dropped
    with torch.no_grad():
        ref = model(x)
    names = attnzoo.replace(model, cls)
    assert len(names) == 12 and names[0] == "features.1.0.attn"
    assert all(type(model.get_submodule(n)) is ours_cls for n in names)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, **F64)
        with attnzoo.capture_maps(model) as maps:
            model(x)
    assert sorted(maps) == sorted(names)
    first = maps["features.1.0.attn"][0]
    assert first.kind == "rows" and first.grid == (16, 16) and first.data.shape[:2] == (1, 3)
    sums = first.data.sum(-1)  # padded keys take part in torchvision's windows but lie off the map
    assert (first.data >= 0).all() and (sums > 0).all() and (sums <= 1 + 1e-12).all()
