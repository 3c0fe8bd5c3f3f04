"""Attention-map capture: `capture_maps` and the per-family map records.

- `capture`: the capture session, `AttentionMap`, `record`;
- `records`: rows for windows, routed regions and local neighbourhoods.
"""

from attnzoo.maps.capture import (
    DEFAULT_QUERIES,
    AttentionMap,
    capture_maps,
    capturing,
    iter_maps,
    query_indices,
    record,
    record_rows,
)

__all__ = [
    "DEFAULT_QUERIES",
    "AttentionMap",
    "capture_maps",
    "capturing",
    "iter_maps",
    "query_indices",
    "record",
    "record_rows",
]
