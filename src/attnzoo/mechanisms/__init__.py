"""The attention mechanisms, one family per file. Importing this package registers every one."""

from attnzoo.mechanisms import (  # noqa: F401 (imported for registration)
    acmix,
    biformer,
    biformer_nchw,
    cbam,
    dual_gated,
    eca,
    ese,
    gather_excite,
    global_context,
    light_cbam,
    mha,
    non_local,
    sagan,
    se,
    seq2seq,
    sk,
    swin,
    temporal,
)
