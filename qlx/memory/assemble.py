"""Turn prompts assembled on device: template pieces and slot ids gathered into one fixed-size buffer per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qlx.memory.templates import TurnTemplate


def assemble_bs(
    turn: TurnTemplate, slots: dict[str, tuple[jax.Array, jax.Array]], width: int
) -> tuple[jax.Array, jax.Array]:
    """Row b's prompt ``piece_0 ‖ slot_0[b, :n_0[b]] ‖ piece_1 ‖ ... ‖ piece_k``, right-padded with 0 to ``width``.

    Args:
      turn: the tokenised template (static).
      slots: for each slot name of ``turn``, ids [B, N_slot] and lengths [B] (ids past the length are ignored).
      width: the buffer S; must hold every row's prompt (the caller sizes it from the slots' widths).

    Returns (tokens_bs int32 [B, S], lengths_b int32 [B]). One gather: the pieces and slots are laid side by side in
    a source row; position j of the output reads the segment whose [start, end) holds j, at offset j − start.
    """
    first = next(iter(slots.values()))[0]
    batch = first.shape[0]
    sources, widths, lengths = [], [], []
    for k, piece in enumerate(turn.pieces):
        sources.append(jnp.broadcast_to(jnp.asarray(np.array(piece, np.int32).reshape(1, -1)), (batch, len(piece))))
        widths.append(len(piece))
        lengths.append(jnp.full((batch,), len(piece), jnp.int32))
        if k < len(turn.slots):
            ids_bn, length_b = slots[turn.slots[k]]
            sources.append(ids_bn.astype(jnp.int32))
            widths.append(ids_bn.shape[1])
            lengths.append(jnp.minimum(length_b.astype(jnp.int32), ids_bn.shape[1]))
    source_bn = jnp.concatenate(sources, axis=1)
    source_start_g = jnp.asarray(np.cumsum([0, *widths[:-1]]), jnp.int32)
    length_bg = jnp.stack(lengths, axis=1)
    end_bg = jnp.cumsum(length_bg, axis=1)
    start_bg = end_bg - length_bg
    j_s = jnp.arange(width, dtype=jnp.int32)
    segment_bs = jnp.sum(j_s[None, :, None] >= end_bg[:, None, :], axis=-1)
    segment_bs = jnp.minimum(segment_bs, len(widths) - 1)
    offset_bs = j_s[None, :] - jnp.take_along_axis(start_bg, segment_bs, axis=1)
    index_bs = source_start_g[segment_bs] + offset_bs
    total_b = end_bg[:, -1]
    tokens_bs = jnp.take_along_axis(source_bn, jnp.clip(index_bs, 0, source_bn.shape[1] - 1), axis=1)
    return jnp.where(j_s[None, :] < total_b[:, None], tokens_bs, 0), total_b
