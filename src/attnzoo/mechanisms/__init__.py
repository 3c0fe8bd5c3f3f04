"""The attention mechanisms, one family per file. Importing this package registers every one."""

from attnzoo.mechanisms import (  # noqa: F401 (imported for registration)
    acmix,
    bat,
    biformer,
    biformer_nchw,
    cbam,
    coord,
    dual_gated,
    mha,
    non_local,
    sagan,
    se,
    seq2seq,
    sk,
    splat,
    swin,
    temporal,
)
