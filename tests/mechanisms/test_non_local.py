"""The non-local block: golden files, all four pairwise modes in 1-D/2-D/3-D against a plain reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import LargestTensor, golden_files

import attnzoo
import attnzoo.kernels.blocked
from attnzoo import NonLocalBlock
from attnzoo.compat import NonLocalBlockND
from attnzoo.mechanisms.non_local import MODES, _concat_sum

F64 = torch.float64
SHAPES = {1: (2, 6, 9), 2: (2, 6, 5, 7), 3: (1, 6, 3, 5, 4)}


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for name, buf in module.named_buffers():
            if "running_mean" in name:
                buf.copy_(torch.randn(buf.shape, generator=gen, dtype=buf.dtype) * 0.1)
            elif "running_var" in name:
                buf.copy_(torch.rand(buf.shape, generator=gen, dtype=buf.dtype) + 0.5)
    return module


def reference(m: NonLocalBlock, x: torch.Tensor):
    """The paper's block written out (the seed's and the widely used port's algorithm), N x N' explicit."""
    b, c1, dim = x.shape[0], m.inter_channels, m.dimension
    conv = [F.conv1d, F.conv2d, F.conv3d][dim - 1]
    kernel = [2, (2, 2), (1, 2, 2)][dim - 1]

    def pool(t):
        return [F.max_pool1d, F.max_pool2d, F.max_pool3d][dim - 1](t, kernel) if m.sub_sample else t

    def project(module, t):
        module = module[0] if isinstance(module, torch.nn.Sequential) else module
        return conv(t, module.weight, module.bias)

    g = pool(project(m.g, x)).reshape(b, c1, -1).transpose(1, 2)  # (B, N', C1)
    if m.mode == "gaussian":
        theta, phi = x.reshape(b, x.shape[1], -1).transpose(1, 2), pool(x).reshape(b, x.shape[1], -1)
    else:
        theta = project(m.theta, x).reshape(b, c1, -1).transpose(1, 2)  # (B, N, C1)
        phi = pool(project(m.phi, x)).reshape(b, c1, -1)  # (B, C1, N')
    keys = phi.shape[-1]
    if m.mode in ("embedded_gaussian", "gaussian"):
        f = torch.softmax(theta @ phi, dim=-1)
    elif m.mode == "dot_product":
        f = theta @ phi / keys
    else:  # concatenation: ReLU(w . [theta_i, phi_j]) on the repeated pairs, as the port does
        th = theta.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, keys)  # (B, C1, N, N')
        ph = phi.unsqueeze(2).expand(-1, -1, theta.shape[1], -1)  # (B, C1, N, N')
        f = F.relu(F.conv2d(torch.cat([th, ph], 1), m.concat_project[0].weight)).squeeze(1) / keys
    y = (f @ g).transpose(1, 2).reshape(b, c1, *x.shape[2:])
    return m.W(y) + x, f


# ----------------------------------------------------------------------------------------------
# Golden files recorded from the seed class


@pytest.mark.parametrize("path", golden_files("seed/NonLocalBlockND__*.pt"), ids=lambda p: p.name)
def test_seed_class_matches_golden(path):
    rec = torch.load(path, weights_only=True)
    m = NonLocalBlockND(**rec["kwargs"]).to(F64).eval()
    m.load_state_dict(rec["state_dict"], strict=True)
    with torch.no_grad():
        out = m(*[rec["inputs"][k] for k in rec["args_order"]])
    assert isinstance(out, torch.Tensor) and out.shape == rec["output"].shape
    assert (out - rec["output"]).abs().max().item() <= 1e-10


# ----------------------------------------------------------------------------------------------
# Every mode, dimension and subsampling against the reference (fused path, then math path)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dimension", [1, 2, 3])
@pytest.mark.parametrize("sub_sample", [True, False])
def test_matches_reference_with_gradients(mode, dimension, sub_sample):
    m = randomize(NonLocalBlock(6, 3, dimension, sub_sample, bn_layer=sub_sample, mode=mode).to(F64)).eval()
    x = torch.randn(*SHAPES[dimension], dtype=F64, requires_grad=True)
    ref, ref_map = reference(m, x)
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [x, *m.parameters()], grad)
    for fused in (True, False):
        with attnzoo.fused_attn(fused):
            y = m(x)
            torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
            for g, w in zip(torch.autograd.grad(y, [x, *m.parameters()], grad), want, strict=True):
                torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)
    y, attn = m(x, return_attention=True)
    torch.testing.assert_close(attn, ref_map, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_fast_path(mode):
    m = randomize(NonLocalBlock(4, 2, 2, sub_sample=True, mode=mode).to(F64)).eval()
    x = torch.randn(1, 4, 4, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True)


def test_train_mode_batch_norm_matches_reference():
    m = randomize(NonLocalBlock(6, 3, 2, sub_sample=True).to(F64)).train()
    twin = copy.deepcopy(m)
    x = torch.randn(3, 6, 6, 5, dtype=F64)
    torch.testing.assert_close(m(x), reference(twin, x)[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(m.W[1].running_mean, twin.W[1].running_mean, atol=1e-12, rtol=1e-12)


def test_capture_attention_stores_detached_map():
    m = randomize(NonLocalBlock(4, 2, mode="dot_product").to(F64)).eval()
    x = torch.randn(2, 4, 4, 6, dtype=F64)
    assert m.last_attention is None
    m.capture_attention = True
    y = m(x)
    assert isinstance(y, torch.Tensor) and m.last_attention.shape == (2, 24, 6)
    torch.testing.assert_close(m.last_attention, reference(m, x)[1], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_default_path_never_builds_the_n_by_n_map(mode, monkeypatch):
    monkeypatch.setattr(attnzoo.kernels.blocked, "_BLOCK_ELEMENTS", 1 << 16)  # blocks of 64 rows here
    m = randomize(NonLocalBlock(8, 4, sub_sample=False, mode=mode))
    x = torch.randn(1, 8, 24, 24, requires_grad=True)  # N = 576
    with LargestTensor() as probe:
        m(x).sum().backward()
    assert probe.largest < 576 * 576 // 2, probe.largest


# ----------------------------------------------------------------------------------------------
# The concatenation mode's sort-and-prefix-sum form


def test_concat_sum_handles_ties_like_relu():
    a = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=F64, requires_grad=True)
    b = torch.tensor([[-1.0, 2.0, 0.0, -0.5, -3.0]], dtype=F64, requires_grad=True)  # a_i + b_j = 0 occurs
    g = torch.randn(1, 5, 3, dtype=F64, requires_grad=True)
    out = _concat_sum(a, b, g)
    ref = F.relu(a.unsqueeze(-1) + b.unsqueeze(1)) @ g
    torch.testing.assert_close(out, ref, atol=1e-14, rtol=1e-14)
    grad = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, (a, b, g), grad), torch.autograd.grad(ref, (a, b, g), grad), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-13, rtol=1e-13)


def test_concat_float32_accuracy_with_large_logits():
    a, b = torch.randn(2, 3000) * 50, torch.randn(2, 2000) * 50
    g = torch.randn(2, 2000, 4)
    out = _concat_sum(a, b, g).float()
    ref = F.relu(a.double().unsqueeze(-1) + b.double().unsqueeze(1)) @ g.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# timm's NonLocalAttn is the embedded-Gaussian block without subsampling (use_scale=False)


@pytest.mark.parametrize("train", [False, True])
def test_matches_timm_non_local_attn(train):
    layers = pytest.importorskip("timm.layers")
    theirs = randomize(layers.NonLocalAttn(16, use_scale=False, rd_channels=8).to(F64), seed=3).train(train)
    ours = NonLocalBlock(16, 8, sub_sample=False, bn_layer=True).to(F64).train(train)
    sd = theirs.state_dict()
    mapping = {"t": "theta", "p": "phi", "g": "g", "z": "W.0", "norm": "W.1"}
    ours.load_state_dict(
        {mapping[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v for k, v in sd.items()}, strict=True
    )
    x = torch.randn(2, 16, 7, 9, dtype=F64)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# Construction and input errors


def test_constructor_defaults_and_errors():
    assert NonLocalBlock(1).inter_channels == 1 and NonLocalBlock(5).inter_channels == 2
    with pytest.raises(ValueError, match=r"dimension must be one of \(1, 2, 3\), got 4"):
        NonLocalBlock(4, dimension=4)
    with pytest.raises(ValueError, match=r"mode must be one of .*embedded_gaussian.*got 'cosine'"):
        NonLocalBlock(4, mode="cosine")
    with pytest.raises(ValueError, match="inter_channels must be >= 1, got 0"):
        NonLocalBlock(4, inter_channels=0)
    with pytest.raises(TypeError, match="sub_sample must be a bool"):
        NonLocalBlock(4, sub_sample="yes")
    with pytest.raises(ValueError, match="dimension must be one of"):
        NonLocalBlockND(4, dimension=0)


def test_state_dict_keys_follow_the_seed_and_the_port():
    assert set(NonLocalBlockND(4).state_dict()) == {
        "g.0.weight",
        "g.0.bias",
        "theta.weight",
        "theta.bias",
        "phi.0.weight",
        "phi.0.bias",
        "W.0.weight",
        "W.0.bias",
        "W.1.weight",
        "W.1.bias",
        "W.1.running_mean",
        "W.1.running_var",
        "W.1.num_batches_tracked",
    }
    assert set(NonLocalBlock(4, sub_sample=False, bn_layer=False, mode="gaussian").state_dict()) == {
        "g.weight",
        "g.bias",
        "W.weight",
        "W.bias",
    }
    assert "concat_project.0.weight" in NonLocalBlock(4, mode="concatenation").state_dict()


@pytest.mark.parametrize("dimension", [1, 2, 3])
def test_input_errors_name_expected_and_given(dimension):
    m = NonLocalBlock(4, dimension=dimension)
    x = torch.randn(*(2, 4) + (4,) * dimension)
    with pytest.raises(ValueError, match=rf"expects x of shape .*\({dimension + 2}-D\), got"):
        m(x.unsqueeze(-1))
    with pytest.raises(ValueError, match="C=4, got"):
        m(torch.randn(*(2, 5) + (4,) * dimension))
    with pytest.raises(ValueError, match="sizes >= 2 with sub_sample=True"):
        m(torch.randn(*(2, 4) + (4,) * (dimension - 1) + (1,)))
    assert NonLocalBlock(4, dimension=dimension, sub_sample=False)(x[..., :1]).shape == x[..., :1].shape
