"""The attention mechanisms, one family per file. Importing this package registers every one."""

from attnzoo.mechanisms import (  # noqa: F401 (imported for registration)
    acmix,
    biformer,
    biformer_nchw,
    cbam,
    cbam_res,
    cbam_seed,
    dual_gated,
    linear,
    mha,
    neighborhood,
    non_local,
    sagan,
    se,
    seq2seq,
    seq2seq_location,
    sk,
    swin,
    temporal,
)
