"""The registry: names, aliases, seed names, metadata, errors."""

from __future__ import annotations

import pytest
from torch import nn

import attnzoo
import attnzoo.compat
from attnzoo import _registry
from attnzoo._registry import Example, register, register_seed


@pytest.fixture
def scratch_registry(monkeypatch):
    """An empty registry for tests that register throw-away classes."""
    monkeypatch.setattr(_registry, "_REGISTRY", {})
    monkeypatch.setattr(_registry, "_ALIASES", {})
    return _registry


def _example():
    return Example(kwargs={"channels": 3}, inputs=((1, 3, 4, 4),), output=(1, 3, 4, 4))


def test_register_create_aliases_and_seed_class(scratch_registry):
    @register(
        "toy",
        family="test",
        paper="Toy",
        year=2020,
        layout="NCHW",
        example=_example(),
        aliases=("toy_gate",),
        seed_name="ToyLayer",
    )
    class Toy(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.channels = channels

    @register_seed("toy")
    class ToyLayer(nn.Module):
        def __init__(self, channel: int):
            super().__init__()
            self.channel = channel

    assert type(attnzoo.create("toy", channels=3)) is Toy
    assert type(attnzoo.create("TOY_GATE", channels=3)) is Toy
    assert type(attnzoo.create("Toy", channels=3)) is Toy
    seed = attnzoo.create("ToyLayer", channel=5)
    assert type(seed) is ToyLayer and seed.channel == 5
    spec = attnzoo.get_spec("toylayer")
    assert spec.name == "toy" and spec.seed_cls is ToyLayer
    assert [s.name for s in attnzoo.list_modules()] == ["toy"]
    assert attnzoo.list_modules(family="nope") == []


def test_duplicate_names_are_rejected(scratch_registry):
    @register("toy", family="t", paper="p", year=1, layout="NCHW", example=_example())
    class A(nn.Module):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register("toy", family="t", paper="p", year=1, layout="NCHW", example=_example())(A)
    with pytest.raises(ValueError, match="already names"):
        register("other", family="t", paper="p", year=1, layout="NCHW", example=_example(), aliases=("toy",))(
            A
        )


def test_bad_layout_is_rejected(scratch_registry):
    with pytest.raises(ValueError, match="layout must be one of"):
        register("toy", family="t", paper="p", year=1, layout="HWC", example=_example())


def test_unknown_name_lists_closest(scratch_registry):
    @register("cbam", family="t", paper="p", year=1, layout="NCHW", example=_example())
    class C(nn.Module):
        pass

    with pytest.raises(ValueError, match=r"unknown attention 'cbm'; did you mean 'cbam'"):
        attnzoo.create("cbm")
    with pytest.raises(TypeError, match="must be a str"):
        attnzoo.create(3)  # type: ignore[arg-type]


def test_every_entry_has_complete_metadata():
    for spec in attnzoo.list_modules():
        assert spec.family and spec.paper and 1990 < spec.year < 2030
        assert spec.layout in _registry.LAYOUTS
        assert spec.example.inputs and spec.example.output
        assert spec.cls.__doc__ and "Shape" in spec.cls.__doc__, (
            f"{spec.name}: docstring needs a Shape section"
        )
        if spec.seed_name:
            assert getattr(attnzoo.compat, spec.seed_name) is not None
            assert spec.seed_name in attnzoo.compat.__all__


def test_seed_and_compat_examples_are_registry_data(scratch_registry, monkeypatch):
    monkeypatch.setattr(_registry, "_COMPAT_EXAMPLES", {})

    @register("toy", family="t", paper="p", year=1, layout="NCHW", example=_example(), seed_name="ToyLayer")
    class Toy(nn.Module):
        def __init__(self, channels: int):
            super().__init__()

    seed_example = Example(kwargs={"channel": 3}, inputs=((1, 3, 4, 4),), output=(1, 3, 4, 4))

    @register_seed("toy", example=seed_example)
    class ToyLayer(nn.Module):
        def __init__(self, channel: int):
            super().__init__()

    official = Example(kwargs={"in_planes": 3}, inputs=((1, 3, 4, 4),), output=(1, 3, 4, 4))

    @_registry.register_compat(example=official)
    class OfficialToy(nn.Module):
        def __init__(self, in_planes: int):
            super().__init__()

    assert attnzoo.get_spec("ToyLayer").seed_example is seed_example
    assert _registry._COMPAT_EXAMPLES == {OfficialToy: official}
    with pytest.raises(TypeError, match="in_planes must be an int, got str"):  # the shared checks apply
        OfficialToy("3")
    with pytest.raises(ValueError, match="'OfficialToy' already has an example"):
        _registry.register_compat(example=official)(OfficialToy)


def test_compat_examples_cover_the_compat_classes():
    found = {name: (cls, ex) for name, cls, ex in _registry.compat_examples()}
    assert found["SELayer"] == (attnzoo.compat.SELayer, attnzoo.get_spec("se").seed_example)
    assert found["MultiheadAttention"][0] is attnzoo.compat.MultiheadAttention
    assert found["WindowAttention"][1].kwargs == {"dim": 8, "window_size": 4, "num_heads": 2}
    classes = {n for n in attnzoo.compat.__all__ if isinstance(getattr(attnzoo.compat, n), type)}
    assert set(found) == classes  # the builder functions have none (tests/test_adversarial.py: EXEMPT)
