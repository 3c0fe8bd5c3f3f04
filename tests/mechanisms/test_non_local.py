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
    b, c1, dim = x.shape[0], m.rd_channels, m.spatial_dims
    conv = [F.conv1d, F.conv2d, F.conv3d][dim - 1]
    kernel = [2, (2, 2), (1, 2, 2)][dim - 1]

    def pool(t):
        return [F.max_pool1d, F.max_pool2d, F.max_pool3d][dim - 1](t, kernel) if m.pool_keys else t

    def project(module, t):
        module = module[0] if isinstance(module, torch.nn.Sequential) else module
        return conv(t, module.weight, module.bias)

    g = pool(project(m.g, x)).reshape(b, c1, -1).transpose(1, 2)  # (B, N', C1)
    if m.pairwise == "gaussian":
        theta, phi = x.reshape(b, x.shape[1], -1).transpose(1, 2), pool(x).reshape(b, x.shape[1], -1)
    else:
        theta = project(m.theta, x).reshape(b, c1, -1).transpose(1, 2)  # (B, N, C1)
        phi = pool(project(m.phi, x)).reshape(b, c1, -1)  # (B, C1, N')
    keys = phi.shape[-1]
    if m.pairwise in ("embedded_gaussian", "gaussian"):
        f = torch.softmax(theta @ phi, dim=-1)
    elif m.pairwise == "dot_product":
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


@pytest.mark.parametrize("pairwise", MODES)
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("pool_keys", [True, False])
def test_matches_reference_with_gradients(pairwise, spatial_dims, pool_keys):
    m = NonLocalBlock(
        6, rd_channels=3, spatial_dims=spatial_dims, pool_keys=pool_keys, batch_norm=pool_keys,
        pairwise=pairwise,
    )
    m = randomize(m.to(F64)).eval()
    x = torch.randn(*SHAPES[spatial_dims], dtype=F64, requires_grad=True)
    ref, ref_map = reference(m, x)
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [x, *m.parameters()], grad)
    for fused in (True, False):
        with attnzoo.fused_attn(fused):
            y = m(x)
            torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
            for g, w in zip(torch.autograd.grad(y, [x, *m.parameters()], grad), want, strict=True):
                torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)
    y, attn = m(x, need_weights=True)
    torch.testing.assert_close(attn, ref_map, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("pairwise", MODES)
def test_gradcheck_fast_path(pairwise):
    m = randomize(NonLocalBlock(4, rd_channels=2, pool_keys=True, pairwise=pairwise).to(F64)).eval()
    x = torch.randn(1, 4, 4, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True)


def test_train_mode_batch_norm_matches_reference():
    m = randomize(NonLocalBlock(6, rd_channels=3, spatial_dims=2, pool_keys=True).to(F64)).train()
    twin = copy.deepcopy(m)
    x = torch.randn(3, 6, 6, 5, dtype=F64)
    torch.testing.assert_close(m(x), reference(twin, x)[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(m.W[1].running_mean, twin.W[1].running_mean, atol=1e-12, rtol=1e-12)


def test_need_weights_returns_the_map():
    m = randomize(NonLocalBlock(4, rd_channels=2, pairwise="dot_product").to(F64)).eval()
    x = torch.randn(2, 4, 4, 6, dtype=F64)
    assert isinstance(m(x), torch.Tensor)
    y, weights = m(x, need_weights=True)
    assert weights.shape == (2, 24, 6)  # 4 x 6 queries, 2 x 3 pooled keys
    torch.testing.assert_close(weights, reference(m, x)[1], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y, m(x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("pairwise", MODES)
def test_default_path_never_builds_the_n_by_n_map(pairwise, monkeypatch):
    monkeypatch.setattr(attnzoo.kernels.blocked, "_BLOCK_ELEMENTS", 1 << 16)  # blocks of 64 rows here
    m = randomize(NonLocalBlock(8, rd_channels=4, pool_keys=False, pairwise=pairwise))
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
    ours = NonLocalBlock(16, rd_channels=8, pool_keys=False, batch_norm=True).to(F64).train(train)
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
    assert NonLocalBlock(1).rd_channels == 1 and NonLocalBlock(5).rd_channels == 2  # max(C // 2, 1)
    assert NonLocalBlock(16, reduction=8).rd_channels == 2
    assert NonLocalBlock(16, 5, reduction=8).rd_channels == 5  # rd_channels wins
    assert NonLocalBlockND(5).inter_channels == 2 and NonLocalBlockND(6, 4).g[0].out_channels == 4
    positional = NonLocalBlock(6, 3, 1, False, False, "gaussian")  # the seed's order, then the pairwise f
    assert (positional.rd_channels, positional.spatial_dims, positional.pool_keys) == (3, 1, False)
    assert isinstance(positional.W, torch.nn.Conv1d) and positional.pairwise == "gaussian"
    with pytest.raises(ValueError, match=r"spatial_dims must be one of \(1, 2, 3\), got 4"):
        NonLocalBlock(4, spatial_dims=4)
    with pytest.raises(ValueError, match=r"pairwise must be one of .*embedded_gaussian.*got 'cosine'"):
        NonLocalBlock(4, pairwise="cosine")
    with pytest.raises(ValueError, match="rd_channels must be >= 1, got 0"):
        NonLocalBlock(4, rd_channels=0)
    with pytest.raises(ValueError, match="reduction must be >= 1, got 0"):
        NonLocalBlock(4, reduction=0)
    with pytest.raises(TypeError, match="pool_keys must be a bool"):
        NonLocalBlock(4, pool_keys="yes")
    with pytest.raises(TypeError, match="batch_norm must be a bool"):
        NonLocalBlock(4, batch_norm=1)
    # the seed class names the seed's arguments
    with pytest.raises(ValueError, match=r"NonLocalBlockND: dimension must be one of \(1, 2, 3\), got 0"):
        NonLocalBlockND(4, dimension=0)
    with pytest.raises(ValueError, match="NonLocalBlockND: inter_channels must be >= 1, got 0"):
        NonLocalBlockND(4, inter_channels=0)
    with pytest.raises(TypeError, match="NonLocalBlockND: in_channels must be an int"):
        NonLocalBlockND(4.0)
    with pytest.raises(TypeError, match="NonLocalBlockND: sub_sample must be a bool"):
        NonLocalBlockND(4, sub_sample="yes")
    with pytest.raises(ValueError, match="sizes >= 2 with sub_sample=True"):
        NonLocalBlockND(4)(torch.randn(1, 4, 1, 5))


def test_device_dtype_and_seed_checkpoints():
    meta = NonLocalBlock(8, pairwise="concatenation", device="meta")
    assert all(t.device.type == "meta" for t in [*meta.parameters(), *meta.buffers()])
    double = NonLocalBlock(8, spatial_dims=3, dtype=torch.float64)
    floating = [t for t in [*double.parameters(), *double.buffers()] if t.is_floating_point()]
    assert floating and all(t.dtype == torch.float64 for t in floating)  # BatchNorm's running stats too
    seed = randomize(NonLocalBlockND(6, 3, dimension=1).double()).eval()
    canonical = NonLocalBlock(6, rd_channels=3, spatial_dims=1).double().eval()
    canonical.load_state_dict(seed.state_dict(), strict=True)
    x = torch.randn(2, 6, 8, dtype=F64)
    torch.testing.assert_close(canonical(x), seed(x), atol=0, rtol=0)


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
    assert set(NonLocalBlock(4, pool_keys=False, batch_norm=False, pairwise="gaussian").state_dict()) == {
        "g.weight",
        "g.bias",
        "W.weight",
        "W.bias",
    }
    assert "concat_project.0.weight" in NonLocalBlock(4, pairwise="concatenation").state_dict()


@pytest.mark.parametrize("dimension", [1, 2, 3])
def test_input_errors_name_expected_and_given(dimension):
    m = NonLocalBlock(4, spatial_dims=dimension)
    x = torch.randn(*(2, 4) + (4,) * dimension)
    with pytest.raises(ValueError, match=rf"expects x of shape .*\({dimension + 2}-D\), got"):
        m(x.unsqueeze(-1))
    with pytest.raises(ValueError, match="C=4, got"):
        m(torch.randn(*(2, 5) + (4,) * dimension))
    with pytest.raises(ValueError, match="sizes >= 2 with pool_keys=True"):
        m(torch.randn(*(2, 4) + (4,) * (dimension - 1) + (1,)))
    assert NonLocalBlock(4, spatial_dims=dimension, pool_keys=False)(x[..., :1]).shape == x[..., :1].shape
