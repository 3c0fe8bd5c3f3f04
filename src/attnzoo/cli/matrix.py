"""The compatibility matrix: where each mechanism runs, and why not where it does not.

Every cell is checked by `tests/test_compat_matrix.py` (and `tests/test_distributed.py` for
DDP and FSDP2): a mechanism passes every feature unless `LIMITATIONS` names the pair with the reason,
and a listed limitation that no longer holds fails the suite too, so this table cannot drift from
what the code does. `python -m tools.gen_docs` writes it into the README and the docs.
"""

from __future__ import annotations

from attnzoo._registry import Spec, get_spec, list_modules

__all__ = ["FEATURES", "LIMITATIONS", "applies", "limitation", "compat_table"]

FEATURES: dict[str, str] = {
    "compile": "`torch.compile` (fwd+bwd)",
    "fullgraph": "`fullgraph=True`",
    "onnx": "ONNX opset 18 = onnxruntime",
    "autocast_bf16": "autocast bf16 (CPU, fwd+bwd)",
    "double_backward": "double backward",
    "flop_counter": "`FlopCounterMode` (fwd+bwd)",
    "torch_func": "`torch.func.grad`",
    "forward_ad": "forward-mode AD (`torch.func.jvp`, dual tensors)",
    "channels_last": "channels_last",
    "jit_trace": "`jit.trace`",
    "jit_script": "`jit.script`",
    "fx": "`torch.fx` (leaf)",
    "ddp": "DDP (gloo)",
    "fsdp2": "FSDP2 `fully_shard` (gloo)",
    "cuda_half": "CUDA fp16/bf16",
}

# Feature -> why no mechanism supports it. A mechanism's own limitations are registry data
# (`register(..., limitations={feature: reason})`). Every entry is re-checked by the tests: a
# limitation that starts passing fails the suite until it is removed.
LIMITATIONS: dict[tuple[str, str], str] = {
    ("*", "jit_script"): (
        "TorchScript cannot compile attnzoo's Python input checks (keyword-variadic shape specs, f-string "
        "errors) nor its custom autograd kernels: `torch.jit.script` raises TypeError saying so; use "
        "torch.compile, torch.export or torch.jit.trace"
    ),
}


def limitation(name: str, feature: str) -> str | None:
    """Why mechanism `name` does not support `feature`, or None when it does."""
    own = get_spec(name).limitations.get(feature)
    return own if own is not None else LIMITATIONS.get(("*", feature))

# Reasons that apply to whole features.
_NOT_RUN = {"cuda_half": "needs a GPU; CI has none (tests skip without CUDA)"}


def applies(spec: Spec, feature: str) -> bool:
    """Whether `feature` means anything for `spec`.

    channels_last needs a 4-D input; DDP needs parameters (it refuses a module without any), and
    FSDP2 has nothing to shard or reduce without them.
    """
    if feature == "channels_last":
        return len(spec.example.inputs[0]) == 4
    if feature in ("ddp", "fsdp2"):
        return any(p.requires_grad for p in spec.cls(**spec.example.kwargs).parameters())
    return True


def compat_table() -> str:
    """The Markdown matrix, with a numbered note per limitation."""
    features = list(FEATURES)
    notes: list[str] = []
    rows = ["| mechanism | " + " | ".join(FEATURES[f] for f in features) + " |",
            "|---|" + "---|" * len(features)]
    for spec in list_modules():
        cells = []
        for feature in features:
            if not applies(spec, feature):
                cells.append("n/a")
            elif feature in _NOT_RUN:
                cells.append("not run")
            elif (why := limitation(spec.name, feature)) is not None:
                if why not in notes:
                    notes.append(why)
                cells.append(f"no [{notes.index(why) + 1}]")
            else:
                cells.append("yes")
        rows.append(f"| `{spec.name}` | " + " | ".join(cells) + " |")
    legend = [f"[{i}] {text}" for i, text in enumerate(notes, 1)]
    legend += [f"not run: {FEATURES[f]} {why}." for f, why in _NOT_RUN.items()]
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {line}" for line in legend)
