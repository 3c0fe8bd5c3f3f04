"""Network surgery: insert, replace, find, on the project's own small CNN and on real backbones."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.surgery import LayoutAdapter, find, insert, replace, select


class Gate(nn.Module):
    """A tiny shape-keeping channel gate, used as a factory-built attention."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(x.mean((2, 3))))[:, :, None, None]


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv2(self.act(self.bn1(self.conv1(x)))))


class SmallCNN(nn.Module):
    """The project's own test network: two stages of blocks, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.layer1 = nn.Sequential(Block(8, 8), Block(8, 8))
        self.layer2 = nn.Sequential(Block(8, 16, 2), Block(16, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(x.mean((2, 3)))


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_select_globs_are_segment_aware():
    model = SmallCNN()
    assert select(model, "layer*.*") == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert select(model, "layer2.*.conv2") == ["layer2.0.conv2", "layer2.1.conv2"]
    assert "layer1.0.conv1" in select(model, "layer1.**")
    assert select(model, nn.Linear) == ["head"]
    assert select(model, lambda n, m: n == "stem") == ["stem"]
    with pytest.raises(ValueError, match=r"selects no sub-module.*similar names: .*layer1"):
        select(model, "layr1.*")
    with pytest.raises(ValueError, match="no sub-module named 'layer9'"):
        select(model, ["layer9"])


def test_insert_with_factory_keeps_weights_and_adds_exact_parameters():
    torch.manual_seed(0)
    model = SmallCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count = params(model)
    x = torch.randn(2, 3, 16, 16)
    names = insert(model, Gate, where="layer*.*", example_input=x)
    assert names == ["layer1.0_attn", "layer1.1_attn", "layer2.0_attn", "layer2.1_attn"]
    after = model.state_dict()
    for key, value in before.items():  # every original key, unchanged
        assert torch.equal(after[key], value)
    added = sum(params(model.get_submodule(n)) for n in names)
    assert added == 2 * (8 * 8 + 8) + 2 * (16 * 16 + 16)
    assert params(model) == count + added
    # Each place has its own module.
    mods = [model.get_submodule(n) for n in names]
    assert len({id(m) for m in mods}) == 4
    # Forward and backward run.
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_insert_after_non_sequential_place_uses_hook_and_changes_output():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    ref = model(x)
    names = insert(model, Gate, where="layer1.0.conv2", example_input=x)
    assert names == ["layer1.0.conv2_attn"]
    assert "layer1.0.conv2.weight" in model.state_dict()
    assert not torch.allclose(model(x), ref)
    with torch.no_grad():  # a gate whose weights push the sigmoid to 1 gives back the original
        gate = model.get_submodule("layer1.0.conv2_attn")
        gate.fc.weight.zero_()
        gate.fc.bias.fill_(50.0)
    torch.testing.assert_close(model(x), ref)


def test_insert_before_position():
    model = SmallCNN()
    x = torch.randn(1, 3, 8, 8)
    names = insert(model, Gate, where="layer2.0.conv1", position="before", example_input=x)
    assert model.get_submodule(names[0]).fc.in_features == 8  # the input of conv1 has 8 channels


def test_insert_without_example_uses_attributes():
    model = SmallCNN()
    insert(model, Gate, where="layer2.*.conv2")
    assert model.get_submodule("layer2.0.conv2_attn").fc.in_features == 16
    with pytest.raises(ValueError, match="cannot infer the channels at layer1.0 .*example_input"):
        insert(SmallCNN(), Gate, where="layer1.0")


def test_shape_changing_insert_names_place_and_shapes():
    model = SmallCNN()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(
        ValueError, match=r"layer1.0 expects to keep the shape \(1, 8, 8, 8\), produced \(1, 8, 4, 4\)"
    ):
        insert(model, lambda c: nn.MaxPool2d(2), where="layer1.0", example_input=x)


def test_shared_module_is_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.conv(self.act(x)))

    with pytest.raises(ValueError, match="act runs 2 times per forward"):
        insert(Shared(), Gate, where="act", example_input=torch.randn(1, 3, 4, 4))


def test_module_instance_is_copied_per_place():
    model = SmallCNN()
    proto = Gate(8)
    names = insert(model, proto, where="layer1.*", example_input=torch.randn(1, 3, 8, 8))
    mods = [model.get_submodule(n) for n in names]
    assert mods[0] is not mods[1] and proto not in mods


def test_surgery_state_dict_round_trip():
    torch.manual_seed(0)
    model = SmallCNN()
    insert(model, Gate, where="layer*.*", example_input=torch.randn(1, 3, 8, 8))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    other = SmallCNN()
    insert(other, Gate, where="layer*.*", example_input=torch.randn(1, 3, 8, 8))
    other.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model.eval()(x), other.eval()(x))
    # The whole model pickles too (hooks are plain objects, not lambdas).
    whole = io.BytesIO()
    torch.save(model, whole)


def test_replace_swaps_module_and_infers_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 12, 3, padding=1)
            self.space_attention = nn.Sequential(
                nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU()
            )

        def forward(self, x):
            x = self.conv(x)
            return x + self.space_attention(x)

    net = Net()
    x = torch.randn(2, 3, 8, 8)
    assert replace(net, "space_attention", Gate, example_input=x) == ["space_attention"]
    assert isinstance(net.space_attention, Gate) and net.space_attention.fc.in_features == 12
    net(x).sum().backward()
    with pytest.raises(ValueError, match=r"conv maps \(2, 3, 8, 8\) to \(2, 12, 8, 8\)"):
        replace(Net(), "conv", Gate, example_input=x)


def test_layout_adapter_round_trips():
    seen = {}

    class Probe(nn.Module):
        def forward(self, t):
            seen["shape"] = tuple(t.shape)
            return t

    x = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(LayoutAdapter(Probe(), "NCHW", "NHWC")(x), x)
    assert seen["shape"] == (2, 3, 4, 5)
    torch.testing.assert_close(LayoutAdapter(Probe(), "NCHW", "NLC")(x), x)
    assert seen["shape"] == (2, 12, 5)


def test_find_lists_third_party_attention_with_flops():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(self.attn(x, x, x, need_weights=False)[0])

    found = find(Net(), example_input=torch.randn(1, 4, 8))
    assert [f.name for f in found] == ["attn"]
    assert found[0].params == sum(p.numel() for p in mha.parameters())
    assert found[0].flops is not None and found[0].flops > 0
    assert find(Net())[0].flops is None


def test_unknown_registry_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attention"):
        insert(SmallCNN(), "no_such_attention", where="layer1.*", example_input=torch.randn(1, 3, 8, 8))
    assert attnzoo.surgery is not None


# --- with registered mechanisms and real backbones ------------------------------------------------


def test_insert_registry_cbam_on_small_cnn():
    model = SmallCNN()
    count = params(model)
    x = torch.randn(2, 3, 16, 16)
    names = insert(model, "cbam", where="layer*.*", example_input=x, reduction=4)
    inserted = [model.get_submodule(n).attention for n in names]  # Sequential places wrap it
    assert [m.channels for m in inserted] == [8, 8, 16, 16]
    expected = sum(params(attnzoo.create("cbam", channels=c, reduction=4)) for c in (8, 8, 16, 16))
    assert params(model) == count + expected
    model(x).sum().backward()


def test_replace_seed_space_attention_with_bra_in_nchw():
    class SeedBlock(nn.Module):
        """The seed's snippet: a max-pool-gated channel branch and a max-gated spatial branch."""

        def __init__(self, channels: int) -> None:
            super().__init__()

            def conv_bn_relu():
                return nn.Sequential(
                    nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU()
                )

            self.channel_attention = conv_bn_relu()
            self.space_attention = conv_bn_relu()

        def forward(self, x):
            x = x + self.channel_attention(x * torch.sigmoid(x.amax((2, 3), keepdim=True)))
            return x + self.space_attention(x * torch.sigmoid(x.amax(1, keepdim=True)))

    net = SeedBlock(16)
    x = torch.randn(2, 16, 12, 12)
    replace(
        net,
        ["channel_attention", "space_attention"],
        "bra",
        n_win=3,
        num_heads=2,
        topk=2,
        auto_pad=True,
        example_input=x,
    )
    assert net.channel_attention is not net.space_attention
    assert isinstance(net.space_attention, attnzoo.BiLevelRoutingAttention)
    assert net(x).shape == x.shape
    net(x).sum().backward()
    kinds = {f.name: f.kind for f in find(net, example_input=x)}
    assert kinds == {"channel_attention": "bra (biformer)", "space_attention": "bra (biformer)"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_insert_cbam_into_torchvision_resnet(arch):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count = params(model)
    blocks = sum(len(getattr(model, f"layer{i}")) for i in range(1, 5))
    x = torch.randn(1, 3, 64, 64)
    names = insert(model, "cbam", where="layer*.*", example_input=x)
    assert len(names) == blocks
    assert params(model) == count + sum(params(model.get_submodule(n)) for n in names)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    model(x).sum().backward()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = getattr(torchvision.models, arch)(weights=None)
    insert(fresh, "cbam", where="layer*.*", example_input=x)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    model.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))


@pytest.mark.slow
def test_replace_timm_se_modules_with_cbam():
    timm = pytest.importorskip("timm")
    from timm.layers import SEModule

    model = timm.create_model("seresnet18", pretrained=False)
    x = torch.randn(1, 3, 64, 64)
    found_before = [f for f in find(model) if f.cls == "SEModule"]
    assert found_before
    names = replace(model, SEModule, "cbam", example_input=x)
    assert len(names) == len(found_before)
    assert not any(isinstance(m, SEModule) for m in model.modules())
    assert all(f.kind.startswith("cbam") for f in find(model))
    model(x).sum().backward()


def test_insert_shifted_window_on_nchw_network():
    model = SmallCNN()
    x = torch.randn(1, 3, 8, 8)
    names = insert(model, "shifted_window", where="layer2.*", example_input=x, window_size=2, num_heads=2)
    assert model.get_submodule(names[0]).attention.layout == "NCHW"
    model(x).sum().backward()


def test_a_model_that_is_no_module_and_an_input_the_model_refuses_are_named():
    for call in (lambda: attnzoo.replace("resnet", "layer1", "se"), lambda: attnzoo.insert(None, "se", "x"),
                 lambda: attnzoo.find("resnet")):
        with pytest.raises(TypeError, match=r"expects model to be a torch.nn.Module, got (str|NoneType)"):
            call()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Identity())
    before = [n for n, _ in model.named_modules()]
    for bad in (torch.randn(1, 4, 9, 9), torch.zeros(1, 3, 9, 9, dtype=torch.long)):
        with pytest.raises(ValueError, match="the model's own forward fails on it, before any"):
            attnzoo.insert(model, "se", "0", example_input=bad)
    assert [n for n, _ in model.named_modules()] == before  # untouched


def test_attention_built_by_name_takes_the_models_dtype():
    """A float64 model gets a float64 attention (it was built in float32, and the check forward refused)."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Identity()).double()
    x = torch.randn(1, 3, 9, 7, dtype=torch.float64)
    assert attnzoo.insert(net, "cbam", nn.ReLU, example_input=x) == ["1_attn"]
    assert attnzoo.replace(net, ["3"], "se", example_input=x) == ["3"]
    assert {p.dtype for p in net.parameters()} == {torch.float64}
    assert net(x).dtype == torch.float64


def _structure(model: nn.Module) -> tuple:
    """Children names and forward hook counts of every module: what surgery changes."""
    return tuple((name, tuple(m._modules), len(m._forward_hooks), len(m._forward_pre_hooks))
                 for name, m in model.named_modules())


def test_insert_that_fails_half_way_leaves_the_model_as_it_was():
    """The second place of a selection failing (here: the first one selected twice), or the check
    forward failing after attaching, undoes every change: no stray `_attn` child or hook stays."""
    x = torch.randn(1, 3, 8, 8)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
    before = _structure(net)
    with pytest.raises(ValueError, match="already has an inserted module 0_attn"):
        attnzoo.insert(net, "se", ["0", "0"], example_input=x)
    assert _structure(net) == before
    with pytest.raises(ValueError, match="C=8"):  # a module built for 8 channels at a 16-channel place
        attnzoo.insert(net, attnzoo.create("se", 8), "0", example_input=x)
    assert _structure(net) == before and net(x).shape == (1, 16, 8, 8)

    class Plain(nn.Module):  # not a Sequential: the attention runs in hooks on the place
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)

        def forward(self, t):
            return self.b(self.a(t))

    plain = Plain()
    before = _structure(plain)
    with pytest.raises(ValueError):
        attnzoo.insert(plain, attnzoo.create("se", 4), ["a", "b"], example_input=x)
    assert _structure(plain) == before


def test_replace_with_a_shape_changing_module_is_refused_by_place_before_any_change():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1))
    before = _structure(net)
    with pytest.raises(ValueError, match=r"at 1 expects to keep the shape \(1, 16, 8, 8\), produced "
                                         r"\(1, 17, 8, 8\)"):
        attnzoo.replace(net, "1", lambda c: nn.Conv2d(c, c + 1, 1), example_input=torch.randn(1, 3, 8, 8))
    assert _structure(net) == before and isinstance(net[1], nn.ReLU)


def test_replace_whose_check_forward_fails_is_undone_with_a_value_error():
    class Fussy(nn.Module):  # keeps the shape when tried alone, then fails inside the model
        calls = 0

        def forward(self, t):
            Fussy.calls += 1
            if Fussy.calls > 1:
                raise RuntimeError("deep inside: second call")
            return t

    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    before = _structure(net)
    with pytest.raises(ValueError, match="replace: the model fails on example_input after the change, "
                                         "which was undone: RuntimeError: deep inside"):
        attnzoo.replace(net, "1", lambda c: Fussy(), example_input=torch.randn(1, 3, 4, 4))
    assert _structure(net) == before and isinstance(net[1], nn.ReLU)


def test_replace_whose_new_module_fails_on_the_place_input_names_the_place():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    with pytest.raises(ValueError, match=r"replace: the attention <lambda> replacing it at 1 fails on its "
                                         r"input \(1, 4, 4, 4\): .*channels"):
        attnzoo.replace(net, "1", lambda c: nn.Conv2d(c + 1, c, 1), example_input=torch.randn(1, 3, 4, 4))
    assert isinstance(net[1], nn.ReLU)


def test_surgery_keeps_each_modules_training_flag_and_the_random_stream():
    """The check forward ran `model.train(was_training)`, unfreezing a BatchNorm set to eval in a
    training model; the shape probe drew from the global generator."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1))
    net.train()
    net[1].eval()  # a frozen BatchNorm in a model being fine-tuned
    x = torch.randn(1, 3, 8, 8)
    torch.manual_seed(5)
    attnzoo.create("se", 8)  # building the new module draws its initial weights, as any module does
    want = torch.rand(3)
    torch.manual_seed(5)
    attnzoo.replace(net, "2", "se", example_input=x)  # nothing else draws
    assert torch.equal(torch.rand(3), want)
    attnzoo.insert(net, "cbam", "0", example_input=x)
    assert net.training and not net.get_submodule("1").training  # (by name: the insert shifts positions)


def test_a_raw_error_in_the_check_forward_becomes_a_value_error():
    class Picky(nn.Module):
        calls = 0

        def forward(self, t):
            Picky.calls += 1
            if Picky.calls > 1:
                raise IndexError("deep inside: index 3 is out of bounds")
            return t

    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    with pytest.raises(ValueError, match="which was undone: IndexError: deep inside"):
        attnzoo.replace(net, "1", lambda c: Picky(), example_input=torch.randn(1, 3, 4, 4))
    assert isinstance(net[1], nn.ReLU)
