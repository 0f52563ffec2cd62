"""The memory agent's multi-conversation RL batch (MemAgent's, docs/memory-and-merging.md §1.7 and §5A.4).

A :class:`qlx.memory.MemoryRollout` of N trajectories holds up to K_max + 1 turns per trajectory. The RL batch is
its valid turns as C independent conversations, in MemAgent's order (every trajectory's turn 0, then turn 1, ...,
then every final turn):

    conversations = {(t, r) : valid[t, r]} in turn-major order,   trajectory_c = r,   turn_c = t
    prompt_c = prompt_ids[t, r, :prompt_lengths[t, r]],   response_c = response_ids[t, r, :response_lengths[t, r]]

The advantage is computed once per trajectory, over the G trajectories of a question (so a question whose document
has more chunks does not weigh more in the group statistics), and then broadcast:

    A_c = A_{trajectory_c},   and the loss weight of response token j of conversation c is A_c · [j < |response_c|]

The keep rules (dynamic sampling, AEPO) act per conversation with the trajectory's advantage and reward, by the same
broadcast. Padding rows (added to reach a fixed row count) carry no token and count for nothing.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qlx.memory.agent import MemoryRollout


@dataclasses.dataclass(frozen=True)
class Conversations:
    """The C valid turns of a rollout as (prompt, response) id pairs, and where each came from.

    prompts, responses: C int32 arrays (the exact ids the agent assembled and sampled; a final stop token included).
    trajectory_c: int32 [C] the trajectory (rollout row) of each conversation. turn_c: int32 [C] its turn index
    (K_max for the final turn). final_c: bool [C] the final-answer turn.
    """

    prompts: tuple[np.ndarray, ...]
    responses: tuple[np.ndarray, ...]
    trajectory_c: np.ndarray
    turn_c: np.ndarray
    final_c: np.ndarray

    def __len__(self) -> int:
        return len(self.prompts)

    def broadcast(self, values_n: np.ndarray) -> np.ndarray:
        """[C, ...]: each conversation's entry of a per-trajectory array ``values_n`` [N, ...] (v_c = v_{r(c)})."""
        return np.asarray(values_n)[self.trajectory_c]


def conversations(rollout: MemoryRollout) -> Conversations:
    """The valid turns of ``rollout`` in MemAgent's order (module docstring)."""
    turn_c, trajectory_c = np.nonzero(rollout.valid)  # row-major over [T, N]: turn-major
    pairs = list(zip(turn_c, trajectory_c, strict=True))
    prompts = tuple(rollout.prompt_ids[t, r, : rollout.prompt_lengths[t, r]] for t, r in pairs)
    responses = tuple(rollout.response_ids[t, r, : rollout.response_lengths[t, r]] for t, r in pairs)
    return Conversations(
        prompts=prompts,
        responses=responses,
        trajectory_c=rollout.trajectory[turn_c, trajectory_c].astype(np.int32),
        turn_c=turn_c.astype(np.int32),
        final_c=rollout.final[turn_c, trajectory_c],
    )
