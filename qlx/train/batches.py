"""Host-side batch assembly: (prompt, response) id lists -> the padded arrays of :mod:`qlx.train.step`, on the mesh.

Rows are ``prompt + response`` right-padded to a length bucket T; the response window R is a length bucket of the
longest response. ``start_b`` is each prompt's length, ``mask_br`` marks the real response tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from qlx.models.sharding import Layout
from qlx.rollout.buckets import length_bucket


def pack_rows(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, pad_id: int
) -> dict[str, np.ndarray]:
    """tokens_bt int32 [B, T], start_b int32 [B], mask_br float32 [B, R] for B (prompt, response) pairs."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    window = length_bucket(max(1, max(len(r) for r in responses)), minimum=8)
    length = length_bucket(max(len(p) for p in prompts) + window)
    tokens_bt = np.full((len(prompts), length), pad_id, np.int32)
    start_b = np.zeros(len(prompts), np.int32)
    mask_br = np.zeros((len(prompts), window), np.float32)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        if len(prompt) < 1:
            raise ValueError(f"row {i}: empty prompt")
        row = list(prompt) + list(response)
        tokens_bt[i, : len(row)] = row
        start_b[i] = len(prompt)
        mask_br[i, : len(response)] = 1.0
    return {"tokens_bt": tokens_bt, "start_b": start_b, "mask_br": mask_br}


def pad_row_values(batch: dict[str, np.ndarray], pad_id: int) -> dict:
    """Values of a padding row (no loss): pad tokens, start 1, zero mask, zero for every other field."""
    values = {name: 0 for name in batch}
    values.update(tokens_bt=pad_id, start_b=1)
    return values


def put_micro_batches(micro_batches: dict[str, np.ndarray], layout: Layout) -> dict[str, jax.Array]:
    """Device arrays [M, b, ...] with the rows of each micro-batch (axis 1) sharded over the batch mesh axes."""
    if layout.mesh is None:
        return {name: jax.device_put(array) for name, array in micro_batches.items()}
    return {
        name: jax.device_put(array, layout.sharding(array.shape, (None, "batch") + (None,) * (array.ndim - 2)))
        for name, array in micro_batches.items()
    }
