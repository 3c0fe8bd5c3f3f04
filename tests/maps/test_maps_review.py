"""Map capture faults a user meets: small maps, recomputed forwards, the maps command's options, plots."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import attnzoo
from attnzoo.kernels.neighbourhood import _reflect_index
from attnzoo.maps import capture_maps


@pytest.mark.parametrize(
    "kwargs, size",
    [
        ({"kernel_att": 7}, (3, 3)),  # padding 3 reaches past the far side: repeated reflection
        ({"kernel_att": 3}, (1, 9)),  # a 1-pixel side repeats its only value
        ({"kernel_att": 5, "dilation": 2}, (2, 3)),
        ({"kernel_att": 3, "stride": 2, "dilation": 3}, (4, 2)),
    ],
)
def test_acmix_rows_on_maps_smaller_than_its_padding_equal_its_weights(kwargs, size):
    torch.manual_seed(0)
    acmix = attnzoo.create("acmix", channels=4, out_channels=8, num_heads=2, **kwargs).double().eval()
    height, width = size
    x = torch.randn(2, 4, height, width, dtype=torch.float64)
    with torch.no_grad():
        _, weights = acmix(x, need_weights=True)  # (B, h, Ho, Wo, k*k)
        out_h, out_w = weights.shape[2:4]
        points = [(y, x0) for y in range(out_h) for x0 in range(out_w)]
        with capture_maps(acmix, queries=points) as maps:
            acmix(x)
    (rows,) = maps["ACmix"]
    assert rows.grid == size and rows.query_grid == (out_h, out_w)
    k, d, s, p = acmix.kernel_att, acmix.dilation, acmix.stride, acmix.padding_att
    src_y, src_x = _reflect_index(height, p, x.device), _reflect_index(width, p, x.device)
    expected = torch.zeros(2, 2, out_h * out_w, height * width, dtype=torch.float64)
    for y in range(out_h):
        for x0 in range(out_w):
            for j in range(k * k):
                pixel = src_y[s * y + d * (j // k)] * width + src_x[s * x0 + d * (j % k)]
                expected[:, :, y * out_w + x0, pixel] += weights[:, :, y, x0, j]
    torch.testing.assert_close(rows.data, expected[:, :, rows.queries], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(rows.data.sum(-1), torch.ones(2, 2, len(points), dtype=torch.float64))


def test_lambda_records_its_spatial_map_with_its_grid_and_the_plot_shows_it():
    from attnzoo.cli.plots import panels

    torch.manual_seed(0)
    layer = attnzoo.create("lambda", channels=8, out_channels=8).eval()
    with torch.no_grad(), capture_maps(layer) as maps:
        layer(torch.randn(2, 8, 5, 7))
    (spatial,) = maps["LambdaLayer"]
    assert spatial.kind == "spatial" and spatial.data.shape == (2, 5, 7) and spatial.grid == (5, 7)
    (panel,) = panels("lambda", spatial, None)
    assert panel.heat is not None and panel.heat.shape == (5, 7)


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.sagan = attnzoo.create("sagan", channels=8)
        self.se = attnzoo.create("se", channels=8)
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(lambda t: self.se(self.sagan(t)), x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputation_records_nothing(reentrant):
    torch.manual_seed(0)
    net = _Checkpointed(reentrant)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    with capture_maps(net) as maps:
        net(x).sum().backward()  # backward recomputes the forward: not a call of its own
        net(x).sum().backward()
    assert {name: len(records) for name, records in maps.items()} == {"sagan": 2, "se": 2}
    assert x.grad is not None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", ""], "--out expects a picture file name such as maps.png, got ''"),
        (["--size", "100000"], "--size expects 8 to 2048 pixels a side, got 100000"),  # was killed for memory
    ],
)
def test_maps_command_refuses_an_empty_out_and_a_size_out_of_range(
    argv, message, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("matplotlib")
    from attnzoo.cli import command

    monkeypatch.chdir(tmp_path)
    assert command.main(["maps", "se", "--train", "0", "--size", "16", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnzoo: error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written (an empty --out wrote '.png' here)


def test_map_panel_titles_of_long_module_names_do_not_overlap(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from attnzoo.cli.plots import plot_maps
    from attnzoo.maps import AttentionMap

    boxes = []

    def save(fig, *args, **kwargs):  # the titles as drawn in the saved figure
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        boxes.extend(ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title())

    monkeypatch.setattr(Figure, "savefig", save)
    query = torch.tensor([5])
    rows = AttentionMap("rows", torch.rand(1, 2, 1, 16), grid=(4, 4), queries=query, query_grid=(4, 4))
    mean = AttentionMap("rows", torch.rand(1, 1, 1, 16), grid=(4, 4), meta={"query": "mean token"})
    maps = {"cross_attention_block.att_attn2": [rows], "cross_attention_block": [mean]}
    plot_maps(torch.rand(3, 16, 16), maps, tmp_path / "m.png", title="cross_attention_block", token_grid=None)
    assert len(boxes) == 3
    for left, right in zip(boxes, boxes[1:], strict=False):  # one row of three panels
        assert left.x1 <= right.x0, f"titles overlap: {left} and {right}"


def test_a_wrapped_panel_title_keeps_its_query_pair_whole(tmp_path, monkeypatch):
    """`mobilevit.layers.0: query (0.52, 0.52)` is wider than a panel: it wraps, and the break falls
    before the pair, not inside it (mobilevit.png read '(0.52,' and '0.52)' on two lines)."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from attnzoo.cli.plots import plot_maps
    from attnzoo.maps import AttentionMap

    titles: list[str] = []
    def save(fig, *args, **kwargs):  # the titles of the saved figure
        titles.extend(ax.get_title() for ax in fig.axes)

    monkeypatch.setattr(Figure, "savefig", save)
    query = torch.tensor([5])
    rows = AttentionMap("rows", torch.rand(1, 2, 1, 16), grid=(4, 4), queries=query, query_grid=(4, 4))
    maps = {"mobilevit.layers.0": [rows], "mobilevit.layers.1": [rows]}  # two records: titles name them
    plot_maps(torch.rand(3, 16, 16), maps, tmp_path / "m.png", title="t", token_grid=None)
    pairs = [t for t in titles if "query" in t]
    assert len(pairs) == 2
    for pair in pairs:
        assert pair.count("\n") == 1 and pair.split("\n")[1].startswith("(") and pair.endswith(")"), pair


def test_a_flat_heat_map_is_drawn_as_what_it_holds_not_as_blank():
    from attnzoo.cli.plots import _upsample, panels
    from attnzoo.maps import AttentionMap

    # Every region routed (a 2 x 2 map with topk 4): the routing panel holds 1 everywhere.
    routing = AttentionMap("routing", torch.tensor([[[0, 1, 2, 3]] * 4]), grid=(2, 2))
    heat = panels("bra", routing, None)[0].heat
    assert heat is not None and (heat == 1).all()
    assert (_upsample(heat, (8, 8), blocky=True) == 1).all()  # was 0 (black) everywhere
    assert (_upsample(torch.zeros(2, 2), (8, 8)) == 0).all()
    ramp = _upsample(torch.tensor([[0.2, 0.4], [0.4, 0.6]]), (2, 2))
    torch.testing.assert_close(ramp, torch.tensor([[0.0, 0.5], [0.5, 1.0]]))


def test_a_16_bit_grey_image_is_stretched_not_clipped_to_white(tmp_path):
    pytest.importorskip("matplotlib")
    import numpy as np
    from PIL import Image

    from attnzoo.cli.plots import load_image

    path = tmp_path / "ramp16.png"
    Image.fromarray(np.linspace(0, 65535, 8 * 16).reshape(8, 16).astype(np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I;16")
    image = load_image(path)  # RGB's conversion clips every value above 255 to white
    assert image.shape == (3, 8, 16)
    assert image.min() == 0 and image.max() == 1
    assert abs(image.mean().item() - 0.5) < 0.01  # a ramp over the whole range, was 0.98
    assert (image[:, :, 1:] >= image[:, :, :-1]).all()  # still increasing along each row


@pytest.mark.parametrize("command_name", [["maps", "se"], ["demo"], ["compare"]])
@pytest.mark.parametrize("seed", [str(2**64 - 1), str(-(2**63) - 1), "1.5"])
def test_commands_refuse_a_seed_torch_cannot_take(command_name, seed, capsys):
    """maps, demo and compare seed torch with --seed (demo and compare also with --seed + 10000): an
    out-of-range or non-integer seed is a one-line argument error before any work (it was an
    OverflowError naming no option)."""
    from attnzoo.cli import command

    with pytest.raises(SystemExit) as exit_info:
        command.main([*command_name, "--seed", seed])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --seed: expects an integer" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_capture_blocks_opened_in_many_threads_restore_torch_fastpath_once():
    """Blocks open and close in 8 threads at once: afterwards no block counts as open and torch's MHA
    fast path is back to what it was (each block switches it off while any is open)."""
    import threading

    from attnzoo.maps import capture as capture_module

    before = torch.backends.mha.get_fastpath_enabled()
    start = threading.Barrier(8)
    seen_on: list[bool] = []

    def worker() -> None:
        start.wait()
        for _ in range(200):
            with attnzoo.capture_maps(nn.Identity()):
                seen_on.append(torch.backends.mha.get_fastpath_enabled())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert capture_module._active == 0 and not any(seen_on) and len(seen_on) == 1600
    assert torch.backends.mha.get_fastpath_enabled() == before


def _registered_and_compat() -> list[tuple[str, object, object]]:
    from attnzoo._registry import compat_examples

    return [(s.name, s.cls, s.example) for s in attnzoo.list_modules()] + compat_examples()


@pytest.mark.parametrize(
    "name, cls, example", _registered_and_compat(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_rows_that_are_not_softmax_rows_say_what_they_are(name, cls, example):
    """A record of rows that are not non-negative rows summing to 1 (or 0 for a masked query) carries a
    `note` (shown under the picture's title): talking heads, no softmax, padding keys left out, ..."""
    torch.manual_seed(0)
    module = cls(**example.kwargs).eval()
    with capture_maps(module) as maps, torch.no_grad():
        module(*(torch.randn(shape) for shape in example.inputs))
    for owner, records in maps.items():
        for rec in (r for r in records if r.kind == "rows"):
            data = rec.data.double()
            sums = data.sum(-1)
            summing_to_1_or_0 = ((sums - 1).abs() < 1e-4).logical_or(sums.abs() < 1e-6).all()
            plain = bool(data.min() >= -1e-6) and bool(summing_to_1_or_0)
            assert plain or isinstance(rec.meta.get("note"), str), (
                f"{name}: {owner}'s rows (min {float(data.min()):.3g}, sums {float(sums.min()):.3g}.."
                f"{float(sums.max()):.3g}) carry no note"
            )


@pytest.mark.parametrize("name", ["mha", "window", "cbam"])
def test_capture_inside_a_fullgraph_compiled_model_equals_eager(name):
    """`torch.compile(model, fullgraph=True)` with a capture open used to fail ('torch.* op returned
    non-Tensor', the backward-pass check); now the compiled call records what eager records, and nothing
    once the block is closed."""
    spec = attnzoo.get_spec(name)
    torch.manual_seed(0)
    module = attnzoo.create(name, **spec.example.kwargs).train()
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    xs = [torch.randn(shape, requires_grad=True) for shape in spec.example.inputs]
    compiled(*xs)  # compiled before any capture opens
    with capture_maps(module) as got:
        out = compiled(*xs)
        (out[0] if isinstance(out, tuple) else out).sum().backward()  # recording survives backward
    with capture_maps(module) as want:
        module(*xs)
    kinds = lambda maps: {k: [r.kind for r in v] for k, v in maps.items()}  # noqa: E731
    assert kinds(got) == kinds(want)
    for key, records in want.items():
        for mine, theirs in zip(got[key], records, strict=True):
            torch.testing.assert_close(mine.data, theirs.data)
    with capture_maps(module) as closed:
        pass
    compiled(*xs)
    assert dict(closed) == {}
