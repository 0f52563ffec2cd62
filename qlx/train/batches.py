"""Host-side batch assembly: (prompt, response) id lists -> the micro-batched arrays of :mod:`qlx.train.step`.

Two steps. :func:`pad_rows` gives one row per sample: ``prompt + response`` right-padded to a length bucket T, the
response window R a length bucket of the longest response; ``start_b`` is each prompt's length, ``mask_br`` marks the
real response tokens, ``length_b`` counts the real tokens. The caller adds per-sample fields (advantages, old
log-probs, a scaled mask) to that dict. :func:`micro_batches` then lays the samples out for the step, either

- padded (``packing=False``): one sample per row, as :func:`pad_rows` gave them; or
- packed (``packing=True``): several samples per row. Samples are placed first-fit by decreasing length into rows of
  ``length_bucket(longest sample)`` tokens; each row carries ``segment_ids_bt`` (1, 2, ... per sample, 0 on
  padding) and ``positions_bt`` (0, 1, ... restarting at every sample), so attention never crosses a sample and RoPE
  sees each sample exactly as it would alone.

Both layouts give every sample its own slot in the per-sample arrays: row-level fields (``tokens_bt``,
``segment_ids_bt``, ``positions_bt``) are [M, b, T]; per-sample fields are [M, b·K, ...] with K slots per row (K = 1
padded; the most samples any row holds, a power of two, packed), slot ``i·K + j`` being segment ``j + 1`` of row
``i``, and ``start_b`` indexing the first response token within its row. Empty slots have ``mask_br`` 0. Per-sample
values are therefore the same numbers in either layout; ``slot_n`` maps sample n to its flat slot index.

Where qlx differs from MaxText / levanter packing: rows hold whole samples of one step (a sample is never split or
carried over to the next batch, so the step-wide token-mean denominator is the unpacked one); the row length and the
row count are buckets of the step's own samples (not a fixed ``max_target_length``); placement is first-fit
decreasing over the whole step rather than streaming first-fit; and the per-sample arrays keep a slot per sample
(log-probs and entropies come back per sample, not per packed row).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np

from qlx.mesh import logical_to_spec
from qlx.models.sharding import Layout
from qlx.rollout.buckets import batch_bucket, length_bucket, round_up

ROW_FIELDS = ("tokens_bt", "segment_ids_bt", "positions_bt")
"""Fields with one entry per row; every other field of a step batch has one entry per sample slot."""


def pad_rows(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, pad_id: int
) -> dict[str, np.ndarray]:
    """One right-padded row per (prompt, response) pair, B pairs.

    Returns tokens_bt int32 [B, T], start_b int32 [B], mask_br float32 [B, R], length_b int32 [B] (prompt + response
    length).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    window = length_bucket(max(1, max(len(r) for r in responses)), minimum=8)
    length = length_bucket(max(len(p) for p in prompts) + window)
    tokens_bt = np.full((len(prompts), length), pad_id, np.int32)
    start_b = np.zeros(len(prompts), np.int32)
    length_b = np.zeros(len(prompts), np.int32)
    mask_br = np.zeros((len(prompts), window), np.float32)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        if len(prompt) < 1:
            raise ValueError(f"row {i}: empty prompt")
        row = list(prompt) + list(response)
        tokens_bt[i, : len(row)] = row
        start_b[i] = len(prompt)
        length_b[i] = len(row)
        mask_br[i, : len(response)] = 1.0
    return {"tokens_bt": tokens_bt, "start_b": start_b, "mask_br": mask_br, "length_b": length_b}


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices, first-fit by decreasing length into bins of ``capacity`` tokens.

    Each bin lists its samples in placement order; ties keep the input order, so the packing is deterministic.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"sample {i} has {lengths[i]} tokens, more than the row length {capacity}")
        for j, free in enumerate(room):
            if lengths[i] <= free:
                bins[j].append(i)
                room[j] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """Micro-batched host arrays of one step and where each sample sits in them.

    arrays: row fields [M, b, T], per-sample fields [M, b·K, ...] (module docstring). slot_n: int [N], sample n's
    index in the flattened slot axis (M·b·K). real_tokens / row_tokens: real and total token positions of the rows
    (their ratio is 1 − the padding fraction).
    """

    arrays: dict[str, np.ndarray]
    slot_n: np.ndarray
    real_tokens: int
    row_tokens: int

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / max(self.row_tokens, 1)

    def per_sample(self, slots: np.ndarray) -> np.ndarray:
        """[M, b·K, ...] per-slot values (a step's output) -> [N, ...] in sample order."""
        slots = np.asarray(slots)
        return slots.reshape(-1, *slots.shape[2:])[self.slot_n]


def micro_batches(
    rows: dict[str, np.ndarray], micro_batch_size: int, *, pad_id: int, packing: bool, batch_multiple: int = 1
) -> StepBatch:
    """:func:`pad_rows`' fields plus per-sample fields ([N, ...]) -> the step's micro-batches.

    micro_batch_size: rows per micro-batch b (0: one micro-batch of every row); padded, a row is one sample.
    Packed, the row count is rounded up to a length bucket (few distinct shapes, so few compilations) and to a
    multiple of ``batch_multiple`` (the batch mesh shards) when it is one micro-batch; padding rows and empty slots
    carry no loss.
    """
    n = len(rows["tokens_bt"])
    length_n = rows["length_b"]
    fields = {name: array for name, array in rows.items() if name not in ("tokens_bt", "length_b")}
    if packing:
        width = length_bucket(int(length_n.max()))
        bins = first_fit(length_n.tolist(), width)
        num_rows = length_bucket(len(bins), minimum=1)
    else:
        width = rows["tokens_bt"].shape[1]
        bins = [[i] for i in range(n)]
        num_rows = n
    if micro_batch_size == 0:
        num_rows = size = round_up(num_rows, batch_multiple)
    else:
        size, num_rows = micro_batch_size, round_up(num_rows, micro_batch_size)
    k = batch_bucket(max(len(b) for b in bins)) if packing else 1
    tokens_bt = np.full((num_rows, width), pad_id, np.int32)
    segment_ids_bt = np.zeros((num_rows, width), np.int32)
    positions_bt = np.zeros((num_rows, width), np.int32)
    slot_n = np.zeros(n, np.int64)
    offset_n = np.zeros(n, np.int32)
    for r, members in enumerate(bins):
        offset = 0
        for j, i in enumerate(members):
            length = int(length_n[i])
            tokens_bt[r, offset : offset + length] = rows["tokens_bt"][i, :length]
            segment_ids_bt[r, offset : offset + length] = j + 1
            positions_bt[r, offset : offset + length] = np.arange(length)
            slot_n[i], offset_n[i] = r * k + j, offset
            offset += length
    arrays = {"tokens_bt": tokens_bt, "segment_ids_bt": segment_ids_bt, "positions_bt": positions_bt}
    for name, array in fields.items():
        fill = 1 if name == "start_b" else 0  # an empty slot's window starts at token 1 (its mask is 0)
        slots = np.full((num_rows * k, *array.shape[1:]), fill, array.dtype)
        slots[slot_n] = array + offset_n if name == "start_b" else array
        arrays[name] = slots
    m = num_rows // size
    arrays = {name: a.reshape(m, size * (1 if name in ROW_FIELDS else k), *a.shape[1:]) for name, a in arrays.items()}
    return StepBatch(arrays, slot_n, int(length_n.sum()), num_rows * width)


def batch_shards(layout: Layout) -> int:
    """Devices the rules split the "batch" axis over on the layout's mesh (1 without a mesh)."""
    if layout.mesh is None:
        return 1
    entry = logical_to_spec(("batch",), dict(layout.rules))[0]
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(layout.mesh.shape[a] for a in axes)


def put_micro_batches(micro_batches: dict[str, np.ndarray], layout: Layout) -> dict[str, jax.Array]:
    """Device arrays [M, b, ...] with the rows of each micro-batch (axis 1) sharded over the batch mesh axes."""
    if layout.mesh is None:
        return {name: jax.device_put(array) for name, array in micro_batches.items()}
    return {
        name: jax.device_put(array, layout.sharding(array.shape, (None, "batch") + (None,) * (array.ndim - 2)))
        for name, array in micro_batches.items()
    }
