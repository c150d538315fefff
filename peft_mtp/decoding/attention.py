"""Grouped-query attention in verify passes on CPU, without copying the keys and values per query head.

transformers' SDPA attention gives a grouped-query model's cached keys and values one copy per query
head (`repeat_kv`) whenever a mask comes with the queries, as it does in every verify pass: CUDA's fast
kernels take grouped heads only without a mask. torch's CPU kernels take them with a mask too
(`enable_gqa=True`), and give the same numbers bit for bit, since each query head reads its group's
keys either way. transformers turns that on with an environment variable of its own,
`TRANSFORMERS_SDPA_FORCE_GQA`, read at every attention call; `grouped_query_sdpa` sets it around one
forward pass and puts it back. A one-token step does not copy them (transformers packs the query heads
instead), so plain decoding has nothing to gain.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

SDPA_FORCE_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"


def uses_sdpa(model) -> bool:
    """Whether the model's attention is transformers' SDPA (the one `grouped_query_sdpa` switches)."""
    return getattr(model.config, "_attn_implementation", None) == "sdpa"


@contextlib.contextmanager
def grouped_query_sdpa(enabled: bool = True) -> Iterator[None]:
    """Let transformers' SDPA attention read grouped key/value heads in place while the block runs.

    Use it around forward passes on CPU only: on CUDA, a mask with grouped heads sends SDPA to its slow
    math kernel.

    Args:
        enabled: False leaves everything as it is (so callers need no second code path).
    """
    if not enabled:
        yield
        return
    previous = os.environ.get(SDPA_FORCE_GQA_ENV)
    os.environ[SDPA_FORCE_GQA_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SDPA_FORCE_GQA_ENV, None)
        else:
            os.environ[SDPA_FORCE_GQA_ENV] = previous
