"""Grouped-query attention in verify passes on CPU, without copying the keys and values per query head.

transformers' SDPA attention gives a grouped-query model's cached keys and values one copy per query
head (`repeat_kv`) whenever a mask comes with the queries, as it does in every verify pass: CUDA's fast
kernels take grouped heads only without a mask. torch's CPU kernels take them with a mask too
(`enable_gqa=True`), and give the same numbers bit for bit, since each query head reads its group's
keys either way. transformers turns that on with an environment variable of its own,
`TRANSFORMERS_SDPA_FORCE_GQA`, read at every attention call; `grouped_query_sdpa` sets it while verify
passes run. A one-token step does not copy them (transformers packs the query heads instead), so plain
decoding has nothing to gain.

The variable is process-wide: while a block is open, SDPA calls of other threads read grouped heads in
place too (exact on CPU; a masked CUDA call would take SDPA's slower math kernel). Overlapping blocks
share one setting, counted under a lock, and a value the user set is left alone.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

SDPA_FORCE_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"

_lock = threading.Lock()
_open_blocks = 0
_set_by_us = False  # whether the open blocks set the variable (and the last to close removes it)


def uses_sdpa(model) -> bool:
    """Whether the model's attention is transformers' SDPA (the one `grouped_query_sdpa` switches)."""
    return getattr(model.config, "_attn_implementation", None) == "sdpa"


@contextlib.contextmanager
def grouped_query_sdpa(enabled: bool = True) -> Iterator[None]:
    """Let transformers' SDPA attention read grouped key/value heads in place while the block runs.

    Use it around forward passes on CPU only: on CUDA, a mask with grouped heads sends SDPA to its slow
    math kernel. If `TRANSFORMERS_SDPA_FORCE_GQA` is already set when the first block opens, it is the
    user's choice and stays as it is.

    Args:
        enabled: False leaves everything as it is (so callers need no second code path).
    """
    global _open_blocks, _set_by_us
    if not enabled:
        yield
        return
    with _lock:
        if _open_blocks == 0:
            _set_by_us = SDPA_FORCE_GQA_ENV not in os.environ
            if _set_by_us:
                os.environ[SDPA_FORCE_GQA_ENV] = "1"
        _open_blocks += 1
    try:
        yield
    finally:
        with _lock:
            _open_blocks -= 1
            if _open_blocks == 0 and _set_by_us:
                os.environ.pop(SDPA_FORCE_GQA_ENV, None)
                _set_by_us = False
