"""A new module that refuses the tensor at its place is refused by place, before the model changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.surgery import LayoutAdapter


def _structure(model: nn.Module) -> tuple:
    return tuple((name, tuple(m._modules), len(m._forward_hooks), len(m._forward_pre_hooks))
                 for name, m in model.named_modules())


class Plain(nn.Module):  # not a Sequential: an inserted module runs in a hook on the place
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


@pytest.mark.parametrize("position, shape", [("after", r"\(2, 8, 32, 32\)"),
                                             ("before", r"\(2, 16, 32, 32\)")])
@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 1)),
                                  Plain], ids=["sequential", "hooked"])
def test_insert_names_the_place_when_the_mechanism_refuses_its_input(make, position, shape):
    """The mechanism's own refusal (a 32x32 map is 1024 tokens; the caller's max_len=64 wins over the one
    that would fit) came from the check forward of the whole model and did not say at which place it was."""
    net = make()
    place = "1" if isinstance(net, nn.Sequential) else "head"
    x = torch.randn(2, 3, 32, 32)
    before = _structure(net)
    with pytest.raises(ValueError, match=rf"^insert: the attention 'aft_full' inserted {position} the module "
                                         rf"at {place} fails on its input {shape}: AFTFull expects at most"):
        attnzoo.insert(net, "aft_full", place, position=position, example_input=x, max_len=64)
    assert _structure(net) == before


def test_replace_names_the_place_when_the_mechanism_refuses_its_input():
    """`replace` let the mechanism's ValueError through as it was, without the place."""
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1))
    with pytest.raises(ValueError, match=r"^replace: the attention 'window' replacing it at 1 fails on its "
                                         r"input \(2, 16, 32, 32\): WindowAttention expects"):
        attnzoo.replace(net, "1", "window", example_input=torch.randn(2, 3, 32, 32))
    assert isinstance(net[1], nn.ReLU)


def test_a_type_error_of_the_new_module_stays_a_type_error_and_names_the_place():
    class Strict(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            raise TypeError("Strict expects a float32 tensor")

    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    with pytest.raises(TypeError, match=r"insert: the attention <lambda> inserted after the module at 0 "
                                        r"fails on its input \(1, 4, 4, 4\): Strict expects"):
        attnzoo.insert(net, lambda c: Strict(), "0", example_input=torch.randn(1, 3, 4, 4))
    assert list(net._modules) == ["0", "1"]


def test_the_trial_run_keeps_each_flag_of_the_new_module():
    """The new module is tried alone in eval mode; `replace` then ran `module.train(True)` on it, which
    unfroze a sub-module the user had set to eval."""
    gate = nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
    gate[0].eval()
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    attnzoo.replace(net, "1", lambda c: gate, example_input=torch.randn(1, 3, 4, 4))
    assert net[1] is gate and gate.training and not gate[0].training


class ChannelsLastStage(nn.Module):
    """Swin's stages in miniature: a patch embedding, then (B, H, W, C) maps through norms and linears."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 24, 2, stride=2)
        self.norm = nn.LayerNorm(24)
        self.stage = nn.Sequential(nn.Linear(24, 24), nn.GELU())
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(x).permute(0, 2, 3, 1))  # (B, H, W, C)
        return self.head(self.stage(x).mean((1, 2)))


@pytest.mark.parametrize("where, position", [("norm", "after"), ("stage", "after"), ("stage", "before"),
                                             ("stage.1", "after")])
def test_a_channels_last_place_gets_its_channels_not_its_height(where, position):
    """A (B, H, W, C) map was taken as NCHW: CBAM got H=8 as its channels and gated the rows, silently."""
    net = ChannelsLastStage()
    x = torch.randn(2, 3, 16, 16)
    names = attnzoo.insert(net, "cbam", where, position=position, example_input=x)
    inserted = net.get_submodule(names[0])
    inserted = getattr(inserted, "attention", inserted)  # a Sequential place wraps it
    assert isinstance(inserted, LayoutAdapter) and (inserted.outer, inserted.inner) == ("NHWC", "NCHW")
    assert inserted.module.ca.channels == 24
    assert net(x).shape == (2, 5)


def test_a_channels_last_mechanism_runs_on_a_channels_last_place_as_is():
    net = ChannelsLastStage()
    x = torch.randn(2, 3, 16, 16)
    names = attnzoo.insert(net, "shifted_window", "norm", num_heads=4, example_input=x)
    inserted = net.get_submodule(names[0])
    assert type(inserted) is type(attnzoo.create("shifted_window", 24, num_heads=4)) and inserted.dim == 24


def test_an_nchw_map_whose_width_equals_a_linears_features_stays_nchw():
    """Only a map whose axis 1 differs from the features is taken as channels-last."""
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Linear(8, 8))  # the linear acts on W=8 of (B, 8, 8, 8)
    names = attnzoo.insert(net, "se", "1", example_input=torch.randn(1, 3, 8, 8))
    assert not isinstance(net.get_submodule(names[0]).attention, LayoutAdapter)


@pytest.mark.parametrize("inner", ["NCHW", "NLC"])
def test_layout_adapter_from_channels_last_round_trips(inner):
    class Probe(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            assert t.shape == ((2, 6, 4, 5) if inner == "NCHW" else (2, 20, 6))
            return t

    x = torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(LayoutAdapter(Probe(), "NHWC", inner)(x), x)
    with pytest.raises(ValueError, match="got NHWC -> NHWC"):
        LayoutAdapter(Probe(), "NHWC", "NHWC")


@pytest.mark.parametrize("name, attr, expected", [
    ("bottleneck", "feat_size", (8, 8)),   # the relative tables of an 8 x 8 map, not the default 7 x 7
    ("gfnet", "feat_size", (8, 8)),        # the filter of an 8 x 8 map, not 14 x 8
    ("bra", "n_win", 4),                   # 4 x 4 regions of 2 x 2 pixels: the default 7 does not divide 8
])
def test_a_measured_place_builds_the_mechanism_for_its_map(name, attr, expected):
    """With `example_input`, a registry name gets the arguments that fit its place's map (it used to keep
    its defaults and be refused at most real places); arguments given by the caller still win."""
    net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1))
    x = torch.randn(2, 3, 32, 32)  # the map after the first convolution: 8 x 8
    attnzoo.insert(net, name, "0", example_input=x)
    cls = attnzoo.get_spec(name).cls
    inner = next(m for m in net.modules() if isinstance(m, cls))  # inside its guard and layout adapter
    value = getattr(inner, attr)
    assert (tuple(value) if isinstance(value, (tuple, list)) else value) == expected
    net(x).sum().backward()
    bigger = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())  # 16 x 16 at the place
    attnzoo.insert(bigger, "aft_full", "0", example_input=x[..., :16, :16], max_len=512)
    cls = attnzoo.get_spec("aft_full").cls
    assert next(m for m in bigger.modules() if isinstance(m, cls)).max_len == 512


def test_replace_without_example_input_keeps_the_defaults():
    """Without `example_input` the place's shape is a guess from the module's attributes, (1, C, 1, 1): it
    was fitted as a 1 x 1 map, so BRA got one region (n_win=1, topk=1) and NAT a 1 x 1 neighbourhood."""
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64))
    attnzoo.replace(net, "1", "bra")
    assert (net[1].n_win, net[1].topk) == (7, 4)
    net(torch.randn(1, 3, 28, 28))
