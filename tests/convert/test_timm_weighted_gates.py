"""timm gates and activations with weights (`gate_layer="prelu"`, `act_layer=nn.PReLU`): converted
with their weights at timm's keys, equal in float64 in outputs and in every gradient, or refused by
name where the attnzoo module cannot hold them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("timm")
from tests.convert._parity import TOL, randomize, x_of  # noqa: E402
from timm.layers import create_attn  # noqa: E402

from attnzoo.convert import from_timm  # noqa: E402

CASES = [
    ("se", {"gate_layer": "prelu"}), ("se", {"act_layer": nn.PReLU}),
    ("ese", {"gate_layer": "prelu"}),
    ("eca", {"gate_layer": "prelu"}), ("ecam", {"gate_layer": "prelu", "act_layer": nn.PReLU}),
    ("ceca", {"gate_layer": "prelu"}),
    ("gc", {"gate_layer": "prelu", "act_layer": nn.PReLU}), ("gca", {"gate_layer": "prelu"}),
    ("cbam", {"gate_layer": "prelu"}),
    ("lcbam", {"gate_layer": "prelu"}),  # timm builds the channel gate but applies F.sigmoid
]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name, options", CASES, ids=[f"{n}-{'-'.join(o)}" for n, o in CASES])
def test_weighted_gates_convert_with_their_weights(name, options, train):
    theirs = randomize(create_attn(name, 16, **options)).train(train)
    ours = from_timm(theirs)
    # every timm tensor is kept (CBAM under its own names; its loader maps timm's)
    assert len(ours.state_dict()) == len(theirs.state_dict())
    assert any("weight" in key and ("gate" in key or "act" in key) for key in ours.state_dict())
    x = x_of(2, 16, 7, 9).requires_grad_()
    expected, got = theirs(x), ours(x)
    torch.testing.assert_close(got, expected, **TOL)
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, [x, *theirs.parameters()], grad, allow_unused=True)
    have = torch.autograd.grad(got, [x, *ours.parameters()], grad, allow_unused=True)
    for (key, _), a, b in zip([("x", x), *theirs.named_parameters()], have, want, strict=True):
        if b is None:  # lcbam's unapplied channel gate
            assert a is None, key
        else:
            torch.testing.assert_close(a, b, **TOL, msg=key)
    # the converted module owns copies: training it leaves timm's module alone
    assert all(p is not q for p, q in zip(ours.parameters(), theirs.parameters(), strict=True))
    fresh = from_timm(randomize(create_attn(name, 16, **options), seed=5))
    fresh.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(fresh.train(train)(x), expected, **TOL)


def test_light_cbam_keeps_the_unapplied_gate_visible():
    ours = from_timm(create_attn("lcbam", 16, gate_layer="prelu"))
    assert "unapplied=PReLU" in repr(ours.channel.gate)


def test_bat_keeps_its_activations_settings():
    """The activation itself is copied, not rebuilt from its class (LeakyReLU's slope was lost)."""
    import functools

    theirs = randomize(create_attn("bat", 16, act_layer=functools.partial(nn.LeakyReLU, 0.5))).eval()
    ours = from_timm(theirs)
    x = x_of(2, 16, 14, 14)
    torch.testing.assert_close(ours(x), theirs(x), **TOL)
    assert ours.conv1.act.negative_slope == 0.5


def test_weighted_activation_of_bat_is_refused_by_name():
    with pytest.raises(TypeError, match=r"BatNonLocalAttn: its activation PReLU has weights"):
        from_timm(create_attn("bat", 16, act_layer=nn.PReLU))
