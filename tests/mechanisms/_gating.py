"""Helpers shared by the gating family's tests (test_se, test_cbam, test_sk, test_dual_gated).

The references in those files follow the seed code (or timm's) step by step with plain autograd
(float64); the fused kernels must give the same outputs, input gradients, parameter gradients and
BatchNorm statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import attnzoo

D = torch.float64
TOL = {"atol": 1e-10, "rtol": 1e-10}


def randomize(
    module: nn.Module, seed: int = 0, keep: Callable[[str], bool] = lambda name: False
) -> nn.Module:
    """Random parameters and BatchNorm statistics, so every parameter and buffer matters; names for
    which `keep(name)` is true stay as they are."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point() or keep(name):
                continue
            if "running_var" in name:
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.5)
    return module


def x_of(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def compare(ours: nn.Module, ref: nn.Module, x: torch.Tensor, *, train: bool, perm: bool = False) -> None:
    """Same outputs, input/parameter gradients and BatchNorm statistics as the reference (float64),
    which has the same state_dict keys.

    `perm`: `ours` takes (C, B, H, W) (`batch_first=False`); the reference takes (B, C, H, W).
    """
    ours = randomize(ours.to(D)).train(train)
    ref = ref.to(D).train(train)
    ref.load_state_dict(ours.state_dict(), strict=True)
    xa = x.to(D).requires_grad_()
    xb = x.to(D).requires_grad_()
    out_a = ours(xa.permute(1, 0, 2, 3) if perm else xa)  # (B, C, H, W) -> (C, B, H, W)
    out_a = out_a.permute(1, 0, 2, 3) if perm else out_a  # (C, B, H, W) -> (B, C, H, W)
    out_b = ref(xb)
    torch.testing.assert_close(out_a, out_b, **TOL)
    grad = torch.randn_like(out_b)
    out_a.backward(grad)
    out_b.backward(grad)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    params_b = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, params_b[name].grad, **TOL, msg=name)
    torch.testing.assert_close(ours.state_dict(), ref.state_dict(), atol=1e-12, rtol=1e-12)  # BN statistics


# ----------------------------------------------------------------------------------------------
# Golden seed recordings


def golden_params(files: list[Path]) -> list:
    if not files:
        return [
            pytest.param(
                None, marks=pytest.mark.skip(reason="no golden seed recordings (shared/golden/seed)")
            )
        ]
    return [pytest.param(f, id=f.stem) for f in files]


def run_golden(cls: Callable[..., nn.Module], path: Path, *, grad: bool = False) -> None:
    """The recorded seed output, within 1e-10, from the no-grad path or (`grad`) the fused autograd path."""
    g = torch.load(path, weights_only=True)
    m = cls(**g["kwargs"]).double().eval()
    m.load_state_dict(g["state_dict"], strict=True)
    xs = [g["inputs"][k].clone().requires_grad_(grad) for k in g["args_order"]]
    with torch.set_grad_enabled(grad):
        out = m(*xs)
    assert out.shape == g["output"].shape
    assert (out.detach() - g["output"]).abs().max().item() <= 1e-10
    if grad:
        out.sum().backward()
        assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs)


# ----------------------------------------------------------------------------------------------
# The fused kernels with unusual layouts and gradients


def _reversed(t: torch.Tensor) -> torch.Tensor:
    """The same values with reversed strides: no (B, C, H*W) view exists."""
    return t.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)  # reverse the strides, same shape


LAYOUTS = {
    "contiguous": lambda t: t.clone(),
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "reversed": _reversed,
}


def _run_with_grad(m: nn.Module, x: torch.Tensor, g: torch.Tensor):
    m.zero_grad()
    x = x.detach().requires_grad_()
    out = m(x)
    out.backward(g)
    return out.detach(), x.grad, [p.grad.clone() for p in m.parameters()]


def example_module(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The registry example of `name`, randomized, float64, in eval mode, with its input."""
    spec = attnzoo.get_spec(name)
    m = randomize(attnzoo.create(name, **spec.example.kwargs).to(D)).eval()
    return m, x_of(*spec.example.inputs[0])


def check_layouts(name: str) -> None:
    """Inputs and upstream gradients in any layout (including ones with no flat view, and a stride-0
    broadcast gradient) give the same outputs and gradients."""
    spec = attnzoo.get_spec(name)
    m, x = example_module(name)
    g = torch.linspace(-1, 1, torch.Size(spec.example.output).numel(), dtype=D).view(spec.example.output)
    expected = _run_with_grad(m, x, g)
    for x_layout, make_x in LAYOUTS.items():
        for g_layout, make_g in LAYOUTS.items():
            got = _run_with_grad(m, make_x(x), make_g(g))
            torch.testing.assert_close(
                got, expected, atol=1e-12, rtol=1e-12, msg=f"x {x_layout}, g {g_layout}"
            )
    dense = torch.full(spec.example.output, 0.5, dtype=D)
    broadcast = torch.full((1, 1, 1, 1), 0.5, dtype=D).expand(spec.example.output)
    torch.testing.assert_close(
        _run_with_grad(m, x, broadcast), _run_with_grad(m, x, dense), atol=1e-12, rtol=1e-12
    )


def check_no_grad_path(name: str) -> None:
    m, x = example_module(name)
    with torch.no_grad():
        plain = m(x)
    torch.testing.assert_close(m(x.requires_grad_()).detach(), plain, atol=1e-13, rtol=1e-13)


def check_need_weights(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`need_weights=True` gives the fused path's output (in training too) and gradients through
    the returned weights; returns the weights."""
    module = randomize(module.to(D)).train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(0)
    plain = module(xa)
    torch.manual_seed(0)
    out, weights = module(xb, need_weights=True)
    torch.testing.assert_close(out, plain, atol=1e-12, rtol=1e-12)
    g = torch.randn_like(plain)
    plain.backward(g)
    (out * g).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-11, rtol=1e-11)
    assert weights.requires_grad
    return weights.detach()


# ----------------------------------------------------------------------------------------------
# timm: attnzoo classes as timm's `attn_layer`


def timm_resnet(attn_layer: object, **kwargs: object) -> nn.Module:
    """timm's resnet18 with `attn_layer` in every block (float64); skips when timm is not installed."""
    timm = pytest.importorskip("timm", reason="timm is not installed (pip install timm)")
    torch.manual_seed(0)
    return timm.create_model(
        "resnet18",
        pretrained=False,
        num_classes=10,
        block_args=dict(attn_layer=attn_layer),
        dtype=D,
        **kwargs,
    )


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_resnet_forward(attn_layer: object) -> nn.Module:
    """resnet18 built with `attn_layer` runs forward and backward (train mode), float64 end to end."""
    model = timm_resnet(attn_layer)
    assert all(t.dtype == D for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())
    x = x_of(2, 3, 32, 32)
    out = model.train()(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().sum().backward()
    return model


def check_resnet_like_timm(ours: object, theirs: str, key_map: Callable[[str], str]) -> None:
    """resnet18 with `ours` as `attn_layer` has the parameter count of timm's `attn_layer=theirs`, and
    timm's weights (random BatchNorm statistics and attention weights), keys mapped by `key_map`,
    give the same logits (float64, 1e-10)."""
    model_ours, model_theirs = timm_resnet(ours), timm_resnet(theirs)
    assert n_params(model_ours) == n_params(model_theirs)
    assert len(model_ours.state_dict()) == len(model_theirs.state_dict())
    # timm's own init for the convolutions keeps activations in range; BatchNorm (zero-init last
    # gamma) and the attention layers get random values so that every one of them matters.
    main_path = ("conv1.weight", "conv2.weight", "downsample.0.weight", "fc.weight", "fc.bias")
    randomize(model_theirs, keep=lambda k: k.endswith(main_path) and ".se." not in k)
    model_ours.load_state_dict({key_map(k): v for k, v in model_theirs.state_dict().items()}, strict=True)
    x = x_of(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model_ours.eval()(x), model_theirs.eval()(x), **TOL)
