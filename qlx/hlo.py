"""Collective traffic of a compiled XLA program, read from its HLO text (``jax.jit(f).lower(...).compile().as_text()``).

:func:`collective_bytes` sums, per collective opcode, the result bytes of every instruction with that opcode: for an
all-gather that is the gathered array, for an all-to-all or a collective-permute what each device receives, for an
all-reduce / reduce-scatter the reduced array. It is a per-device figure (SPMD HLO is one device's program) and a
proxy for bytes on the wire that is stable across backends, which is what comparisons of two partitionings need.
"""

from __future__ import annotations

import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute", "ragged-all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4}
_INSTRUCTION = re.compile(r"=\s*(.+?)\s+(" + "|".join(sorted(COLLECTIVES, key=len, reverse=True)) + r")(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """{opcode: summed result bytes} over the collectives of ``hlo_text`` (every opcode of COLLECTIVES, 0 if absent).

    An async ``*-start`` counts once (its ``*-done`` is skipped); its tuple result's last shape is the output."""
    totals = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.search(line)
        if match is None:
            continue
        shapes = _SHAPE.findall(match.group(1))
        if match.group(3):
            shapes = shapes[-1:]
        totals[match.group(2)] += sum(
            _BYTES.get(dtype, 8 if dtype.endswith("64") else 4) * math.prod(int(d) for d in dims.split(",") if d)
            for dtype, dims in shapes
        )
    return totals
