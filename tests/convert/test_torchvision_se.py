"""torchvision's squeeze-excitation (`torchvision.ops.misc.SqueezeExcitation`, in its EfficientNet,
MobileNetV3 and RegNetY) -> `attnzoo.SqueezeExcite`: module parity in float64, whole models swapped by
`attnzoo.replace` with the same logits and input gradients, checkpoints loading, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.convert import converter_for, from_torchvision

misc = pytest.importorskip("torchvision.ops.misc", reason="torchvision is not installed")
import torchvision  # noqa: E402

TOL = dict(atol=1e-10, rtol=1e-10)
# torch's float64 hardsigmoid backward multiplies by 1/6 rounded to float32 (3e-8 relative); attnzoo's
# HardSigmoid uses the float64 sixth, so gradients through a hard-sigmoid gate agree to that.
HARD_TOL = dict(atol=1e-8, rtol=5e-8)
NAMES = {"activation.": "act.", "scale_activation.": "gate."}  # theirs -> ours, weighted activations


def randomized(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return module


GATES = [(nn.ReLU, nn.Sigmoid), (nn.SiLU, nn.Sigmoid), (nn.ReLU, nn.Hardsigmoid), (nn.PReLU, nn.Sigmoid)]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("act, gate", GATES, ids=lambda c: c.__name__)
def test_module_parity_in_outputs_and_gradients(act, gate, train):
    theirs = randomized(misc.SqueezeExcitation(12, 5, act, gate)).train(train)
    ours = from_torchvision(theirs)
    assert isinstance(ours, attnzoo.SqueezeExcite) and ours.training == train
    x = torch.randn(3, 12, 5, 7, dtype=torch.float64, requires_grad=True)
    expected, got = theirs(x), ours(x)
    torch.testing.assert_close(got, expected, **TOL)
    grad = torch.randn_like(expected)
    names = [n for n, _ in theirs.named_parameters()]
    ours_params = dict(ours.named_parameters())
    mapped = [next((v + n[len(k):] for k, v in NAMES.items() if n.startswith(k)), n) for n in names]
    want = torch.autograd.grad(expected, [x, *theirs.parameters()], grad)
    have = torch.autograd.grad(got, [x, *(ours_params[n] for n in mapped)], grad)
    for a, b in zip(have, want, strict=True):
        torch.testing.assert_close(a, b, **(HARD_TOL if gate is nn.Hardsigmoid else TOL))
    assert len(ours_params) == len(names)
    assert all(ours_params[m] is not p for m, p in zip(mapped, theirs.parameters(), strict=True))
    # torchvision's keys load into the converted module (a weighted activation under its own name)
    fresh = from_torchvision(randomized(misc.SqueezeExcitation(12, 5, act, gate), seed=3))
    fresh.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(fresh.train(train)(x), expected, **TOL)


def with_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, torchvision's own initialisation, random BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)
    model.double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf"])
def test_replace_in_torchvision_models_keeps_logits_and_checkpoints(name):
    torch.manual_seed(0)
    model = with_statistics(getattr(torchvision.models, name)(num_classes=5))
    ours = copy.deepcopy(model)
    swapped = attnzoo.replace(ours, misc.SqueezeExcitation)
    assert swapped and all(isinstance(ours.get_submodule(n), attnzoo.SqueezeExcite) for n in swapped)
    assert not any(isinstance(m, misc.SqueezeExcitation) for m in ours.modules())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    # a whole network's input gradient sums rounding over many layers: 1e-9 relative (the hard-sigmoid
    # gates of MobileNetV3 add torch's float32 sixth)
    tol = HARD_TOL if name.startswith("mobilenet") else dict(atol=1e-12, rtol=1e-9)
    for train in (False, True):
        model.train(train)
        ours.train(train)
        torch.manual_seed(1)  # the same dropout and stochastic-depth draws
        expected = model(x)
        torch.manual_seed(1)
        got = ours(x)
        torch.testing.assert_close(got, expected, **TOL)
        (want,) = torch.autograd.grad(expected.sum(), x)
        (have,) = torch.autograd.grad(got.sum(), x)
        torch.testing.assert_close(have, want, **tol)
    reloaded = copy.deepcopy(ours)
    reloaded.load_state_dict(model.state_dict(), strict=True)
    with attnzoo.capture_maps(ours.eval()) as maps:
        ours(x.detach())
    assert len(maps) == len(swapped)


def test_frozen_parameters_stay_frozen_and_hooks_move_along():
    model = torchvision.models.mobilenet_v3_small(num_classes=5)
    model.features.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    calls: list[str] = []
    first = next(m for m in model.modules() if isinstance(m, misc.SqueezeExcitation))
    first.register_forward_hook(lambda *_: calls.append("hook"))
    attnzoo.replace(model, misc.SqueezeExcitation)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    model.eval()(torch.randn(1, 3, 64, 64))
    assert calls == ["hook"]


def test_converter_is_registered_and_refusals_name_the_reason():
    assert converter_for(misc.SqueezeExcitation) is from_torchvision

    class Scaled(misc.SqueezeExcitation):
        def forward(self, input):
            return 2 * super().forward(input)

    with pytest.raises(TypeError, match=r"cannot convert .*Scaled: it overrides forward"):
        from_torchvision(Scaled(8, 2))
    grouped = misc.SqueezeExcitation(8, 4)
    grouped.fc1 = nn.Conv2d(8, 4, 1, groups=2)
    with pytest.raises(TypeError, match="its fc1 is not a plain 1x1 nn.Conv2d with bias"):
        from_torchvision(grouped)
    with pytest.raises(TypeError, match="ShiftedWindowAttentionV2 or SqueezeExcitation, got Linear"):
        from_torchvision(nn.Linear(2, 2))
