"""The attention mechanisms, one family per file. Importing this package registers every one."""

from attnzoo.mechanisms import (  # noqa: F401 (imported for registration)
    acmix,
    bam,
    biformer,
    biformer_nchw,
    cbam,
    cbam_res,
    cbam_seed,
    dual_gated,
    mha,
    non_local,
    sagan,
    se,
    sge,
    seq2seq,
    seq2seq_location,
    shuffle,
    sk,
    swin,
    temporal,
)
