"""Host-side batch assembly: (prompt, response) id lists -> the micro-batched arrays of :mod:`qlx.train.step`.

Two steps. :func:`pad_rows` gives one row per sample: ``prompt + response`` right-padded to a length bucket T, the
response window R a length bucket of the longest response; ``start_b`` is each prompt's length, ``mask_br`` marks the
real response tokens (the loss weights), ``length_b`` counts the real tokens. The caller adds per-sample fields to
that dict: [N] (one value per sample, e.g. advantages) or [N, R] (one per response token, e.g. old log-probs).
:func:`micro_batches` then lays the samples out for the step, either

- padded (``packing=False``): one sample per row, as :func:`pad_rows` gave them; a slot is a sample's window of R
  response tokens; or
- packed (``packing=True``): several samples per row. Samples are placed first-fit by decreasing length into rows of
  ``row_length`` tokens (``train.packed_length``; 0, the default: a length bucket of the step's longest sample);
  each row carries ``segment_ids_bt`` (1, 2, ... per sample, 0 on padding) and ``positions_bt`` (0, 1, ...
  restarting at every sample), so attention never crosses a sample and RoPE sees each sample exactly as it would
  alone. A slot is one response token (window W = 1): a micro-batch's slots are its samples' response tokens (S, a
  bucket of the most any micro-batch has), so only real response tokens reach the vocabulary projection.

Row fields (``tokens_bt``, ``segment_ids_bt``, ``positions_bt``) are [M, b, T]; slot fields are [M, b·K, W] (K = 1,
W = R padded; W = 1, b·K = S packed). Slot s of a micro-batch reads the window that starts (its first target token)
at ``start_b[s]`` of row s // K, the micro-batch's rows read as one flat sequence of b·T tokens (packed, a slot's
target may lie in another row). With ``batch_multiple`` P (the batch mesh shards) the slots come in P groups, each
reading only its own shard's rows (padded: always; packed: by construction), recorded as the width of
``slot_groups_g`` [M, P], so the step gathers hidden states on each device. Per-sample values are the
same numbers in either layout, placed at their tokens' slots; :meth:`StepBatch.per_sample` maps a step's per-slot
output back to [N, R]. Empty slots have ``mask_br`` 0.

Where qlx differs from MaxText / levanter packing: rows hold whole samples of one step (a sample is never split or
carried over to the next batch, so the step-wide token-mean denominator is the unpacked one), so the row count
varies by step (a length bucket: a few compilations); rows default to the step's longest sample rather than a fixed
``max_target_length`` (on CPU the tiny demo model's attention made longer rows slower: BUILD_NOTES.md); placement
is first-fit decreasing over the whole step rather than streaming first-fit; and the loss reads only the response
tokens' hidden states (MaxText and levanter project every position of the packed row and mask the loss), which keeps
RL's short responses from paying for their long prompts in the vocabulary projection.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np

from qlx.mesh import logical_to_spec, spec_axes
from qlx.models.sharding import Layout
from qlx.rollout.buckets import batch_bucket, length_bucket, round_up

ROUTING = "routing_btmk"
"""Optional per-token field of :func:`pad_rows`' rows: the rollout's routed experts, int [N, T, M, k] aligned with
``tokens_bt`` (-1: none recorded; ``rl.routing_replay``). Laid out with the tokens (packed: at each sample's offset
in its row), -1 on padding."""

ROW_FIELDS = ("tokens_bt", "segment_ids_bt", "positions_bt", ROUTING)
"""Fields with one entry per row; every other field of a step batch but :data:`SLOT_GROUPS` has one per sample slot."""

SLOT_GROUPS = "slot_groups_g"
"""Zeros [M, G]: the step reads only the width G, the groups the micro-batch's rows and slots were laid out in (a
slot reads only rows of its own group; 1 when the field is absent). See :func:`micro_batches`."""


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


def pad_row_count(rows: dict[str, np.ndarray], total: int, pad_id: int) -> dict[str, np.ndarray]:
    """:func:`pad_rows`' B rows followed by ``total − B`` rows that count for nothing (one pad token, start 1,
    length 1, zero mask; zero in every other field), e.g. to bucket a step's row count or make it divide evenly."""
    extra = total - len(rows["tokens_bt"])
    if extra < 0:
        raise ValueError(f"{len(rows['tokens_bt'])} rows do not fit in {total}")
    values = {name: 0 for name in rows} | {"tokens_bt": pad_id, "start_b": 1, "length_b": 1, ROUTING: -1}
    return {
        name: np.concatenate([a, np.broadcast_to(np.asarray(values[name], a.dtype), (extra, *a.shape[1:]))])
        for name, a in rows.items()
    }


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
    """Micro-batched host arrays of one step and where each sample's response tokens sit in them.

    arrays: row fields [M, b, T], slot fields [M, b·K, W] (module docstring). index_nr: int [N, R], the flat index
    (into M·b·K·W) of sample n's response token r, -1 past its response. real_tokens / row_tokens: real and total
    token positions of the rows (1 − their ratio is the padding fraction).
    """

    arrays: dict[str, np.ndarray]
    index_nr: np.ndarray
    real_tokens: int
    row_tokens: int

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / max(self.row_tokens, 1)

    def per_sample(self, slots: np.ndarray) -> np.ndarray:
        """[M, b·K, W] per-slot values (a step's log-probs, entropies) -> [N, R] per response token, 0 past it."""
        flat = np.asarray(slots).reshape(-1)
        return np.where(self.index_nr >= 0, flat[np.maximum(self.index_nr, 0)], 0).astype(flat.dtype)


def micro_batches(
    rows: dict[str, np.ndarray],
    micro_batch_size: int,
    *,
    pad_id: int,
    packing: bool,
    row_length: int = 0,
    batch_multiple: int = 1,
    coarse: bool = False,
) -> StepBatch:
    """:func:`pad_rows`' fields plus per-sample fields ([N] or [N, R]) -> the step's micro-batches.

    micro_batch_size: rows per micro-batch b (0: one micro-batch of every row); padded, a row is one sample.
    Packed, rows are ``row_length`` tokens (at least a length bucket of the longest sample), and go into the fewest
    micro-batches of at most ``micro_batch_size`` rows, b a length bucket (few distinct shapes, so few
    compilations) rounded up to a multiple of ``batch_multiple`` (the batch mesh shards). Padding rows and empty
    slots carry no loss. ``coarse`` rounds the packed row length, the rows per micro-batch and its slots up to powers
    of two instead (at most 2x padding rather than 25%, but far fewer shapes): for steps whose samples change in
    number and length from step to step, such as the RL update after dynamic sampling and AEPO left rows out, where
    every new shape compiles the step again.
    """
    n, window = rows["mask_br"].shape
    length_n, start_n = rows["length_b"], rows["start_b"]
    response_n = length_n - start_n
    if packing:
        bucket = batch_bucket if coarse else functools.partial(length_bucket, minimum=1)
        longest = int(length_n.max())
        width = max(row_length, batch_bucket(longest) if coarse else length_bucket(longest))
        bins = first_fit(length_n.tolist(), width)
        micro_count = 1 if micro_batch_size == 0 else -(-len(bins) // micro_batch_size)
        size = round_up(bucket(-(-len(bins) // micro_count)), batch_multiple)
        if micro_batch_size:
            size = min(size, round_up(micro_batch_size, batch_multiple))
        num_rows = round_up(len(bins), size)
    else:
        width = rows["tokens_bt"].shape[1]
        bins = [[i] for i in range(n)]
        size = n if micro_batch_size == 0 else micro_batch_size
        num_rows = round_up(n, size)
    tokens_bt = np.full((num_rows, width), pad_id, np.int32)
    segment_ids_bt = np.zeros((num_rows, width), np.int32)
    positions_bt = np.zeros((num_rows, width), np.int32)
    offset_n = np.zeros(n, np.int32)
    row_n = np.zeros(n, np.int64)
    routing = rows.get(ROUTING)
    if routing is not None:
        routing_bt = np.full((num_rows, width, *routing.shape[2:]), -1, routing.dtype)
    for r, members in enumerate(bins):
        offset = 0
        for j, i in enumerate(members):
            length = int(length_n[i])
            tokens_bt[r, offset : offset + length] = rows["tokens_bt"][i, :length]
            if routing is not None:
                routing_bt[r, offset : offset + length] = routing[i, :length]
            segment_ids_bt[r, offset : offset + length] = j + 1
            positions_bt[r, offset : offset + length] = np.arange(length)
            offset_n[i], row_n[i] = offset, r
            offset += length
    arrays = {"tokens_bt": tokens_bt, "segment_ids_bt": segment_ids_bt, "positions_bt": positions_bt}
    if routing is not None:
        arrays[ROUTING] = routing_bt
    fields = {name: a for name, a in rows.items() if name not in ("tokens_bt", "length_b", "start_b", ROUTING)}
    if packing:
        shape = (num_rows, size, width)
        arrays |= _token_slots(fields, bins, shape, start_n + offset_n, response_n, bucket, groups=batch_multiple)
        index_nr = arrays.pop("index_nr")
        k = arrays["start_b"].shape[0] // num_rows
    else:
        k = 1
        index_nr = np.where(np.arange(window) < response_n[:, None], np.arange(n * window).reshape(n, window), -1)
        arrays["start_b"] = np.ones(num_rows, np.int32)  # a padding row's window starts at token 1 (its mask is 0)
        arrays["start_b"][:n] = start_n
        for name, array in fields.items():
            arrays[name] = np.zeros((num_rows, *array.shape[1:]), array.dtype)
            arrays[name][:n] = array
    m = num_rows // size
    arrays = {name: a.reshape(m, size * (1 if name in ROW_FIELDS else k), *a.shape[1:]) for name, a in arrays.items()}
    arrays[SLOT_GROUPS] = np.zeros((m, slot_groups(size, batch_multiple)), np.int8)
    return StepBatch(arrays, index_nr, int(length_n.sum()), num_rows * width)


def slot_groups(rows: int, shards: int) -> int:
    """Slot groups G of a micro-batch of ``rows`` rows on ``shards`` batch shards: the shards when they divide the
    rows, else 1 (padded rows of a count the shards do not divide)."""
    return shards if rows % shards == 0 else 1


def _token_slots(
    fields: dict,
    bins: list[list[int]],
    shape: tuple[int, int, int],
    target_n,
    response_n,
    bucket: Callable,
    *,
    groups: int = 1,
) -> dict:
    """Packed slot fields: one slot per response token, micro-batch by micro-batch, plus ``index_nr``.

    Micro-batch m (rows m·b .. m·b + b − 1) gets S slots in ``groups`` G equal groups (the batch mesh shards): group
    g holds the response tokens of rows g·b/G .. (g + 1)·b/G − 1 in row order, then empty slots, so a slot reads
    only rows of its own shard. S/G is ``bucket`` of the most any group has (a length bucket, or a power of two
    when coarse), rounded up to a multiple of b/G (K = S / b slots per row). Slot s of a micro-batch predicts the
    token at flat position ``(s // K)·T + start_b[s]`` of that micro-batch's rows read as one sequence (so start_b
    may lie outside the slot's nominal row s // K, never outside its group). [N] fields repeat over the sample's
    tokens, [N, R] fields give each token its own value."""
    n, window = fields["mask_br"].shape
    num_rows, size, width = shape
    rows_per_group = size // groups
    grouped = [bins[g : g + rows_per_group] for g in range(0, num_rows, rows_per_group)]
    counts = [int(sum(response_n[i] for members in rows for i in members)) for rows in grouped]
    group_slots = round_up(bucket(max(counts)), rows_per_group)
    k = group_slots // rows_per_group
    index_nr = np.full((n, window), -1, np.int64)
    start_s = np.ones(len(grouped) * group_slots, np.int32)
    for g, rows in enumerate(grouped):
        slot = first = g * group_slots
        for r, members in enumerate(rows):
            for i in members:
                count = int(response_n[i])
                index_nr[i, :count] = np.arange(slot, slot + count)
                local = np.arange(slot, slot + count) - first  # the slots' indices within the group
                start_s[slot : slot + count] = (r - local // k) * width + target_n[i] + np.arange(count)
                slot += count
    real = index_nr >= 0
    out = {"start_b": start_s, "index_nr": index_nr}
    for name, array in fields.items():
        per_token = array[:, :, None] if array.ndim > 1 else np.broadcast_to(array[:, None, None], (n, window, 1))
        values = np.zeros((len(grouped) * group_slots, 1), array.dtype)
        values[index_nr[real]] = per_token[real]
        out[name] = values if array.ndim > 1 else values[:, 0]
    return out


def batch_shards(layout: Layout) -> int:
    """Devices the rules split the "batch" axis over on the layout's mesh (1 without a mesh)."""
    if layout.mesh is None:
        return 1
    entry = logical_to_spec(("batch",), dict(layout.rules))[0]
    axes = spec_axes(entry)
    return math.prod(layout.mesh.shape[a] for a in axes)


def put_micro_batches(micro_batches: dict[str, np.ndarray], layout: Layout) -> dict[str, jax.Array]:
    """Device arrays [M, b, ...] with the rows of each micro-batch (axis 1) sharded over the batch mesh axes."""
    if layout.mesh is None:
        return {name: jax.device_put(array) for name, array in micro_batches.items()}
    return {
        name: jax.device_put(array, layout.sharding(array.shape, (None, "batch") + (None,) * (array.ndim - 2)))
        for name, array in micro_batches.items()
    }
