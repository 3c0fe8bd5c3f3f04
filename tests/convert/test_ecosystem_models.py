"""attnzoo as a drop-in in real timm / fightingcv models (random init, no downloads): whole models keep
their outputs after `attnzoo.replace(model, ForeignClass)`, timm checkpoints still load into the
replaced model, and classes whose converted module is called differently are swapped in as
subclasses called fightingcv's way."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from tests.convert._parity import D, randomize
from torch import nn

import attnzoo

timm = pytest.importorskip("timm", reason="timm is not installed")
from timm.layers import create_attn  # noqa: E402
from timm.layers.cbam import CbamModule  # noqa: E402
from timm.layers.non_local_attn import NonLocalAttn  # noqa: E402
from timm.layers.selective_kernel import SelectiveKernel  # noqa: E402


def _perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A copy of a state_dict with every floating tensor moved a little (another "checkpoint")."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if value.is_floating_point():
            noise = torch.rand(value.shape, generator=gen, dtype=value.dtype) * 0.1
            value = value + noise if "running_var" in key else value + noise - 0.05
        out[key] = value.clone()
    return out


def test_skresnet18_replaced_keeps_its_logits_and_loads_timm_checkpoints() -> None:
    model = randomize(timm.create_model("skresnet18", pretrained=False, num_classes=10)).eval()
    checkpoint = _perturbed(model.state_dict(), seed=1)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 40, 56, dtype=D)
    names = attnzoo.replace(model, SelectiveKernel)
    assert len(names) == 8 and all(type(model.get_submodule(n)).__name__ == "SKConv" for n in names)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-10, rtol=1e-10)
    # A timm checkpoint (timm's keys: paths.i.conv, attn.fc_select, ...) loads strictly after the swap.
    model.load_state_dict(checkpoint, strict=True)
    reference.load_state_dict(checkpoint, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-10, rtol=1e-10)
    model.load_state_dict(model.state_dict(), strict=True)  # attnzoo's own keys still load
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the key hook pickles with the model
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    reloaded.load_state_dict(checkpoint, strict=True)
    model.train()
    model(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(("name", "cls"), [("cbam", CbamModule), ("nl", NonLocalAttn)])
def test_renamed_timm_keys_load_after_replace(name: str, cls: type[nn.Module]) -> None:
    model = randomize(nn.Sequential(nn.Conv2d(3, 32, 1), create_attn(name, 32), nn.Conv2d(32, 4, 1))).eval()
    checkpoint = _perturbed(model.state_dict(), seed=2)
    reference = copy.deepcopy(model)
    reference.load_state_dict(checkpoint, strict=True)
    assert attnzoo.replace(model, cls) == ["1"]
    model.load_state_dict(checkpoint, strict=True)
    x = torch.randn(2, 3, 7, 9, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    ("arch", "kwargs", "size"),
    [
        ("resnest14d", {}, (48, 40)),
        ("lambda_resnet26t", {}, (64, 64)),
        ("gcresnet33ts", {}, (40, 48)),
        ("eca_botnext26ts_256", {"img_size": 64}, (64, 64)),
        ("legacy_seresnet18", {}, (32, 40)),  # timm.models.senet's own SEModule
        ("hgnet_tiny", {}, (64, 64)),  # timm.models.hgnet's EseModule (its conv.* keys renamed)
    ],
)
def test_timm_models_with_attention_keep_their_logits(arch: str, kwargs: dict, size: tuple[int, int]) -> None:
    from attnzoo.convert import converter_for

    model = randomize(timm.create_model(arch, pretrained=False, num_classes=5, **kwargs)).eval()
    reference = copy.deepcopy(model)
    classes = {type(m) for m in model.modules() if converter_for(m) is not None}
    assert classes
    for cls in classes:
        assert attnzoo.replace(model, cls)
    assert not any(converter_for(m) is not None for m in model.modules())
    x = torch.randn(1, 3, *size, dtype=D)
    with torch.no_grad():
        ours, theirs = model(x), reference(x)
    torch.testing.assert_close(ours, theirs, atol=1e-10 * theirs.abs().max().item(), rtol=1e-10)
    reference.load_state_dict(_perturbed(reference.state_dict(), seed=3))
    model.load_state_dict(reference.state_dict(), strict=True)


def _fcv(path: str) -> type[nn.Module]:
    module, _, name = path.rpartition(".")
    fcv = pytest.importorskip(f"fightingcv_attention.attention.{module}", reason="fightingcv missing")
    return getattr(fcv, name)


_MASK = torch.rand(2, 1, 7, 5, generator=torch.Generator().manual_seed(3)) < 0.3  # True = masked
_MASK[..., 0] = False  # every query keeps a key (fightingcv gives NaN for a fully masked one)


def first_output(out):
    return out[0] if isinstance(out, tuple) else out


class _Caller(nn.Module):
    """A model that calls its attention fightingcv's way (`call(attn, x)`)."""

    def __init__(self, attn: nn.Module, call) -> None:
        super().__init__()
        self.attn, self.call = attn, call

    def forward(self, x: torch.Tensor):
        return self.call(self.attn, x)


@pytest.mark.parametrize(
    ("path", "args", "shape", "call"),
    [
        ("EMSA.EMSA", (16, 8, 8, 2), (2, 49, 16), lambda m, x: m(x, x, x)),
        ("EMSA.EMSA", (16, 8, 8, 2, 0.0, 5, 6, 1, False), (2, 30, 16), lambda m, x: m(x, x, x)),
        ("gfnet.GlobalFilter", (16, 6, 4), (2, 36, 16), lambda m, x: m(x)),
        ("gfnet.GlobalFilter", (16, 4, 4), (2, 24, 16), lambda m, x: m(x, spatial_size=(4, 6))),
        ("DAT.DAttentionBaseline", ((6, 6), (6, 6), 2, 8, 1, 0.0, 0.0, 1, 2, True, False, False, False, 2),
         (2, 16, 6, 6), lambda m, x: m(x)),
        # fightingcv's 4th argument is True where a logit is masked (attnzoo's mask: True = attend)
        ("SelfAttention.ScaledDotProductAttention", (16, 8, 4, 2), (2, 7, 16),
         lambda m, x: m(x, x[:, :5], x[:, :5], _MASK)),
        ("SimplifiedSelfAttention.SimplifiedScaledDotProductAttention", (16, 2), (2, 7, 16),
         lambda m, x: m(x, x[:, :5], x[:, :5], attention_mask=_MASK)),
        ("MUSEAttention.MUSEAttention", (16, 8, 8, 2), (2, 5, 16),
         lambda m, x: m(x, x, x, _MASK[..., :5, :])),
    ],
)
def test_replace_keeps_fightingcv_calls_that_the_canonical_class_changes(path, args, shape, call) -> None:
    # EMSA's converted module is called forward(x), GlobalFilter's takes maps, DAT's returns one
    # output: replace swaps in the subclass called fightingcv's way, with fightingcv's numbers.
    cls = _fcv(path)
    # fightingcv's GlobalFilter computes in float32 whatever the input: compare it in float32
    dtype = torch.float32 if "GlobalFilter" in path else D
    model = _Caller(randomize(cls(*args)).to(dtype), call).eval()
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    # fightingcv's MUSE overwrites its parameters in forward: run a copy for the reference
    want = copy.deepcopy(model)(x.clone())
    attnzoo.replace(model, cls)
    assert not isinstance(model.attn, cls)
    got = model(x.clone())
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    assert len(got) == len(want)
    tol = {"atol": 1e-10, "rtol": 1e-10} if dtype == D else {}
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)
    canonical = type(attnzoo.convert.convert(cls(*args)))  # convert alone gives the canonical class
    assert isinstance(model.attn, canonical) and type(model.attn) is not canonical
    # fightingcv's own checkpoint still loads (renamed keys included), and the model pickles
    fresh = _Caller(randomize(cls(*args), seed=5).to(dtype), call).eval()
    model.load_state_dict(fresh.state_dict(), strict=True)
    expected = first_output(copy.deepcopy(fresh)(x.clone()))
    torch.testing.assert_close(first_output(model(x.clone())), expected, **tol)
    buffer = io.BytesIO()
    torch.save(model.attn, buffer)  # (the test caller holds a lambda)


@pytest.mark.parametrize("path", ["SelfAttention.ScaledDotProductAttention",
                                  "SimplifiedSelfAttention.SimplifiedScaledDotProductAttention"])
def test_replaced_attention_reads_a_3d_mask_as_fightingcv_broadcasts_it(path: str) -> None:
    # fightingcv's masked_fill broadcasts attention_mask against (B, h, L, S) from the right: a 3-D
    # mask is (h, L, S) there (attnzoo's own 3-D mask is (B, L, S)); with B == h both would run.
    cls = _fcv(path)
    args = (16, 8, 4, 2) if "Simplified" not in path else (16, 2)
    mask = _MASK[:, 0]  # (2, 7, 5): B = h = 2
    model = _Caller(randomize(cls(*args)), lambda m, x: m(x, x[:, :5], x[:, :5], mask)).eval()
    x = torch.randn(2, 7, 16, dtype=D, generator=torch.Generator().manual_seed(1))
    want = model(x)
    attnzoo.replace(model, cls)
    torch.testing.assert_close(model(x), want, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match=r"attention_mask broadcastable to \(3, 2, 7, 5\), got \(3, 7, 5\)"):
        model.attn(x[:1].expand(3, -1, -1), x[:1, :5].expand(3, -1, -1), x[:1, :5].expand(3, -1, -1),
                   torch.zeros(3, 7, 5, dtype=torch.bool))  # fightingcv: a broadcasting RuntimeError


@pytest.mark.parametrize(
    ("path", "kwargs", "shape"),
    [
        ("OutlookAttention.OutlookAttention", {"dim": 16, "num_heads": 2}, (2, 5, 6, 16)),  # v_pj -> v
        ("MobileViTv2Attention.MobileViTv2Attention", {"d_model": 16}, (2, 7, 16)),  # fc_i/k/v -> qkv
        ("SEAttention.SEAttention", {"channel": 16, "reduction": 4}, (2, 16, 5, 6)),
        ("CBAM.CBAMBlock", {"channel": 16, "reduction": 4, "kernel_size": 3}, (2, 16, 5, 6)),
        ("SKAttention.SKAttention", {"channel": 16, "reduction": 4}, (2, 16, 5, 6)),
        ("AFT.AFT_FULL", {"d_model": 16, "n": 9}, (2, 9, 16)),
        ("TripletAttention.TripletAttention", {}, (2, 4, 5, 6)),
        ("ParNetAttention.ParNetAttention", {"channel": 16}, (2, 16, 5, 6)),
    ],
)
def test_fightingcv_checkpoints_load_after_replace(path: str, kwargs: dict, shape: tuple[int, ...]) -> None:
    # The converters rename, reshape and stack fightingcv's weights; a key map traced at conversion
    # (attnzoo.convert._source_keys) lets fightingcv's own state_dict load into the swapped model.
    cls = _fcv(path)
    model = nn.Sequential(randomize(cls(**kwargs))).eval()
    checkpoint = _perturbed(model.state_dict(), seed=4)
    reference = copy.deepcopy(model)
    reference.load_state_dict(checkpoint, strict=True)
    attnzoo.replace(model, cls)
    assert not isinstance(model[0], cls)
    model.load_state_dict(checkpoint, strict=True)
    x = torch.randn(shape, dtype=D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-10, rtol=1e-10)
    model.load_state_dict(model.state_dict(), strict=True)  # attnzoo's own keys still load
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the key map pickles with the model
    buffer.seek(0)
    torch.load(buffer, weights_only=False).load_state_dict(checkpoint, strict=True)


def _renaming(fn):
    """A converter `Linear -> Sequential(Linear)` (keys renamed) whose weight is `fn(source)`."""

    def convert(m: nn.Module) -> nn.Module:
        out = nn.Sequential(nn.Linear(3, 2, dtype=m.weight.dtype))  # converters keep the dtype
        with torch.no_grad():
            out[0].weight.copy_(fn(m))
            out[0].bias.copy_(m.bias)
        return out

    return convert


@pytest.mark.parametrize(
    ("fn", "mapped"),
    [
        (lambda m: m.weight.flip(1), True),  # a genuine move: mapped
        (lambda m: 2 * m.weight, False),  # computed: the marks do not decode
        # marks that decode to valid positions of the wrong values: only the random replay sees it
        (lambda m: (m.weight - m.weight[0, 0] + m.bias[0]).clamp(max=m.bias[1]), False),
        (lambda m: m.weight - m.weight[0, 0] + m.bias.repeat(2)[:3], False),
    ],
)
def test_key_maps_are_traced_only_for_copies(fn, mapped: bool) -> None:
    from attnzoo.convert._source_keys import attach_source_keys

    source = nn.Linear(3, 2)
    convert = _renaming(fn)
    target = convert(source)
    attach_source_keys(source, target, convert)
    assert bool(target._load_state_dict_pre_hooks) == mapped
    if mapped:
        other = nn.Linear(3, 2)
        target.load_state_dict(other.state_dict(), strict=True)  # the source's keys, through the map
        torch.testing.assert_close(target[0].weight, fn(other))


def test_key_map_checks_shapes_and_maps_integer_buffers() -> None:
    cls = _fcv("SKAttention.SKAttention")
    model = nn.Sequential(cls(channel=16, reduction=4))
    wider = nn.Sequential(cls(channel=32, reduction=4)).state_dict()
    checkpoint = _perturbed(model.state_dict(), seed=6)
    counts = {k: torch.tensor(123) for k in checkpoint if k.endswith("num_batches_tracked")}
    checkpoint.update(counts)
    attnzoo.replace(model, cls)
    with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
        model.load_state_dict(wider, strict=True)  # another width fails loudly, never silently
    model.load_state_dict(checkpoint, strict=True)
    tracked = [m.num_batches_tracked for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert tracked and all(int(t) == 123 for t in tracked)  # renamed BatchNorm counters are mapped


def test_replace_on_the_meta_device_still_converts() -> None:
    cls = _fcv("MobileViTv2Attention.MobileViTv2Attention")
    with torch.device("meta"):
        model = nn.Sequential(cls(16))
    attnzoo.replace(model, cls)
    assert type(model[0]).__name__ == "SeparableSelfAttention" and model[0].qkv.weight.is_meta


def test_replaced_emsa_without_reduction_attends_over_the_keys_and_values_it_is_given() -> None:
    """With ratio=1 fightingcv projects keys and values as given: other tensors (another length, or the
    same values through another path) get their own gradients, as there."""
    cls = _fcv("EMSA.EMSA")
    theirs = randomize(cls(16, 8, 6, 2, 0.0, 5, 6, 1, True)).eval()
    ours = nn.Sequential(copy.deepcopy(theirs))
    attnzoo.replace(ours, cls)
    assert type(ours[0]).__name__ == "FightingcvCallEMSA"
    gen = torch.Generator().manual_seed(3)
    x, other = (torch.randn(2, n, 16, dtype=D, generator=gen) for n in (30, 7))
    calls = [
        lambda m, q, k: m(q, k, k * 2.0),  # cross-attention over 7 tokens
        lambda m, q, k: m(q, k, k.detach()),  # keys: the queries' values on another leaf
    ]
    for call, keys in zip(calls, (other, x), strict=True):
        results = []
        for module in (theirs, ours[0]):
            q, k = x.clone().requires_grad_(), keys.clone().requires_grad_()
            out = call(module, q, k)
            out.square().sum().backward()
            results.append((out, q.grad, k.grad))
            module.zero_grad()
        for got, want in zip(*results[::-1], strict=True):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for keys, grid in ((x.clone(), (5, 6)), (other, (1, 7))):  # the map's grid for keys of its length
        with attnzoo.capture_maps(ours) as maps:
            ours[0](x, keys, keys)
        (record,) = maps["0"]
        assert record.grid == grid and record.data.shape[-1] == grid[0] * grid[1]


def test_replaced_emsa_refuses_masks_and_keys_that_do_not_fit() -> None:
    cls = _fcv("EMSA.EMSA")
    model = _Caller(cls(16, 8, 8, 2, 0.0, 5, 6, 1, False), lambda m, x: m(x, x, x)).eval()
    attnzoo.replace(model, cls)
    x = torch.randn(2, 30, 16)
    with pytest.raises(ValueError, match="attention_mask"):
        model.attn(x, x, x, attention_mask=torch.zeros(2, 2, 30, 30, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"values of shape \(2, 9, 16\)"):
        model.attn(x, x[:, :9], x)
    with pytest.raises(ValueError, match="keys"):
        model.attn(x, torch.randn(3, 30, 16), x)
    with pytest.raises(ValueError, match="keys and values given together .* got only keys"):
        model.attn(x, x[:, :9])
    with pytest.raises(TypeError, match="keys of dtype torch.float32"):
        model.attn(x, x.double(), x)


def test_timm_swin_v2_swaps_whole_with_its_logits_checkpoint_and_window_resize() -> None:
    sv2 = pytest.importorskip("timm.models.swin_transformer_v2", reason="timm without Swin V2")
    torch.manual_seed(0)
    model = sv2.SwinTransformerV2(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                                  window_size=4, num_classes=5).to(D).eval()
    randomize(model)  # also logit_scale, q/v biases and the position MLP away from their init
    checkpoint = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(1))
    want = model(x)
    names = attnzoo.replace(model, sv2.WindowAttention)
    assert len(names) == 4 and all(isinstance(model.get_submodule(n), attnzoo.compat.TimmWindowAttentionV2)
                                   for n in names)
    torch.testing.assert_close(model(x), want, atol=1e-10, rtol=1e-10)  # shifted blocks: timm's mask
    model.load_state_dict(checkpoint, strict=True)  # timm's own checkpoint, as it is
    model.train()
    model(x).square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    attn = model.get_submodule(names[0])
    attn.set_window_size((2, 2))  # what timm's set_input_size calls
    assert attn.relative_coords_table.shape == (1, 3, 3, 2) and attn.relative_position_index.shape == (4, 4)
    with pytest.raises(TypeError, match="mask to be a float tensor"):
        attn(torch.randn(8, 4, 16, dtype=D), mask=torch.zeros(2, 4, 4, dtype=torch.bool))


def test_timm_vit_attention_swaps_whole_with_its_logits_checkpoint_and_maps() -> None:
    vt = pytest.importorskip("timm.models.vision_transformer", reason="timm without ViT")
    torch.manual_seed(0)
    model = vt.VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, qkv_bias=True,
                                 qk_norm=True, num_classes=5).to(D).eval()
    randomize(model)
    checkpoint = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(1))
    want = model(x)
    with attnzoo.fused_attn(False):  # the float64 math path, not the SDPA kernel timm runs too
        names = attnzoo.replace(model, timm.layers.Attention)
        assert names == ["blocks.0.attn", "blocks.1.attn"]
        torch.testing.assert_close(model(x), want, atol=1e-10, rtol=1e-10)
    model.load_state_dict(checkpoint, strict=True)
    with attnzoo.capture_maps(model) as maps:
        model(x)
    assert sorted(maps) == names and maps[names[0]][0].data.shape[:2] == (2, 2)  # (B, h, queries, 17)
    # attn_mask as SDPA takes it (True = may attend), against timm's module on the same weights
    theirs = timm.layers.Attention(16, num_heads=2, qkv_bias=True).to(D).eval()
    randomize(theirs)
    ours = attnzoo.convert.convert(theirs)
    tokens = torch.randn(2, 6, 16, dtype=D)
    keep = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(2)) < 0.7
    keep[..., 0] = True
    for mask, causal in ((keep, False), (None, True)):
        torch.testing.assert_close(ours(tokens, attn_mask=mask, is_causal=causal),
                                   theirs(tokens, attn_mask=mask, is_causal=causal), atol=1e-10, rtol=1e-10)


def test_replaced_emsa_without_reduction_runs_any_token_count_and_equal_keys() -> None:
    # fightingcv's EMSA reads its H x W only to reduce the keys: with ratio=1 any N runs
    cls = _fcv("EMSA.EMSA")
    model = _Caller(randomize(cls(16, 8, 6, 4, 0.0, 4, 4, 1, False)), lambda m, x: m(x, x.clone(), x)).eval()
    x = torch.randn(2, 20, 16, dtype=D)
    want = model(x)
    attnzoo.replace(model, cls)
    torch.testing.assert_close(model(x), want, atol=1e-10, rtol=1e-10)


def test_the_most_specific_converter_wins_over_a_parents_in_place_one() -> None:
    cls = _fcv("SelfAttention.ScaledDotProductAttention")

    class Mine(cls):  # a user's subclass with its own converter
        pass

    mine = lambda m: nn.Identity()  # noqa: E731
    attnzoo.convert.register(Mine, mine)
    assert attnzoo.convert.in_place_converter_for(Mine) is mine
    assert attnzoo.convert.in_place_converter_for(cls) is not mine


def test_replace_keeps_frozen_parameters_frozen() -> None:
    """The converters copy weights into new parameters (renamed, reshaped): a frozen module stays frozen,
    and in a partly frozen one exactly the parameters built from frozen ones are."""
    model = nn.Sequential(nn.Conv2d(3, 16, 1), create_attn("cbam", 16), create_attn("se", 16),
                          SelectiveKernel(16, rd_channels=8))
    model[1].requires_grad_(False)
    model[3].paths[0].conv.weight.requires_grad_(False)
    se = _fcv("SEAttention.SEAttention")(16, 4)
    se.fc[0].weight.requires_grad_(False)
    model.append(se)
    for cls in (CbamModule, type(model[2]), SelectiveKernel, type(se)):
        attnzoo.replace(model, cls)
    assert not any(p.requires_grad for p in model[1].parameters())
    assert all(p.requires_grad for p in model[2].parameters())
    assert [n for n, p in model[3].named_parameters() if not p.requires_grad] == ["convs.0.0.weight"]
    assert [n for n, p in model[4].named_parameters() if not p.requires_grad] == ["fc1.weight"]


def test_replace_keeps_forward_hooks() -> None:
    """Hooks registered on the foreign module (timm's FeatureHooks, a user's) keep firing on the swap."""
    model = nn.Sequential(create_attn("cbam", 16), _fcv("SEAttention.SEAttention")(16, 4))
    seen: list[str] = []
    for i, module in enumerate(model):
        module.register_forward_pre_hook(lambda m, args, i=i: seen.append(f"pre{i}"))
        module.register_forward_hook(lambda m, args, out, i=i: seen.append(f"post{i} {tuple(out.shape)}"))
    attnzoo.replace(model, CbamModule)
    attnzoo.replace(model, type(model[1]))
    model(torch.randn(2, 16, 3, 5))
    assert seen == ["pre0", "post0 (2, 16, 3, 5)", "pre1", "post1 (2, 16, 3, 5)"]


def _tiny_swin() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                           window_size=4, num_classes=5)


def _tiny_beit() -> nn.Module:
    from timm.models.beit import Beit

    return Beit(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, use_rel_pos_bias=True,
                num_classes=5)


@pytest.mark.parametrize(("build", "resize"), [
    (_tiny_swin, {"img_size": (48, 48), "window_size": 6}),  # Swin V1: set_input_size -> set_window_size
    (_tiny_beit, {"img_size": (48, 48)}),  # BEiT: the 4 x 4 patch window becomes 6 x 6
])
def test_timm_set_input_size_still_works_after_replace(build, resize: dict) -> None:
    """timm's `set_input_size` calls `attn.set_window_size` on every block: after `replace` the swapped
    module resizes its position table as timm's (the same interpolation), so the logits stay timm's."""
    theirs = randomize(build()).eval()
    ours = copy.deepcopy(theirs)
    classes = {type(m) for m in ours.modules() if attnzoo.convert.converter_for(m) is not None}
    for cls in classes:
        assert attnzoo.replace(ours, cls)
    theirs.set_input_size(**resize)
    ours.set_input_size(**resize)
    x = torch.randn(2, 3, 48, 48, dtype=D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-10, rtol=1e-10)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # the resized checkpoint still loads
