"""Memory-agent RL (``train.mode: memory``; recipe §3.2, MemAgent's multi-conversation RL).

One step, sharing everything after the rollout with full-context RL (:class:`qlx.train.rl.RLJob`):

    P questions, an equal share per task type          (the RL job's TaskBalancedSampler)
    -> G trajectories each: qlx.memory.run reads the record's whole context chunk by chunk (``memory`` settings,
       sampling from ``rollout``), on the live parameters, random stream (seed, step)
    -> rewards r[P·G] of the final answers              (the task verifiers, as RL)
    -> advantages A[P·G] per trajectory                 (``rl.advantage``: "task" as the recipe, "group_mean" the
                                                         r − mean of MemAgent), before any turn is expanded
    -> the batch: every valid turn of every trajectory as one conversation (qlx.memory.batch), A and r of its
       trajectory broadcast to it; padded with zero-weight rows to a bucketed row count (few compiled shapes)
    -> RLJob.policy_update: log-probs and entropy under the current parameters, AEPO on the batch entropy over all
       turns with its keep rule per conversation, then ``rl.updates_per_batch`` optimizer steps, the loss a token
       mean over all turns of the (mini-)batch, exactly micro-batched

Questions are the record's question with its options (q_core) and its answer-format line (q_inst, shown in the
final turn only: ``qlx.data.prompts.question_parts``); documents are the record's context, tokenised once per record
and kept on the host. Checkpoints and exact resume are the RL job's (sampler and AEPO state).
"""

from __future__ import annotations

import time

import jax
import numpy as np

from qlx.config import RLConfig, memory_agent_config
from qlx.data.prompts import question_parts
from qlx.data.records import read_context
from qlx.memory import MemoryRollout, run
from qlx.memory.batch import Conversations, conversations
from qlx.rollout.buckets import length_bucket, round_up
from qlx.train.batches import pad_row_count, pad_rows
from qlx.train.rl import RLJob, group_statistics, per_task_metrics, score, step_seed


def trajectory_values(config: RLConfig, rollout: MemoryRollout, conv: Conversations, rewards_n, task_n):
    """((A_c, r_c, keep_c), keep_n): each conversation's advantage, reward and keep flag, those of its trajectory.

    The advantage is computed over the N trajectories (groups = questions, ``rl.advantage``), never over the
    expanded turns, so the number of chunks of a document does not change any group or task statistic; keep_n is
    False for the trajectories of zero-variance groups under ``rl.dynamic_sampling``.
    """
    rewards_n = np.asarray(rewards_n, np.float32)
    group_size = len(rewards_n) // (rollout.question_index.max() + 1)
    task_n = np.asarray(task_n, np.int32)
    adv_n, keep_n = group_statistics(config, rewards_n, rollout.question_index, task_n, group_size)
    return (conv.broadcast(adv_n), conv.broadcast(rewards_n), conv.broadcast(keep_n)), keep_n


class MemoryRLJob(RLJob):
    """The memory-agent RL step (module docstring); state, checkpoints and the difficulty re-filter are RLJob's (the
    re-filter's pass rates are the agent's)."""

    def __init__(self, config, dataset, policy, rest, optimizer, layout, *, run_dir, shardings=None):
        super().__init__(config, dataset, policy, rest, optimizer, layout, run_dir=run_dir, shardings=shardings)
        self.agent = memory_agent_config(config)
        self._documents: dict[str, np.ndarray] = {}

    def question(self, i: int) -> tuple[str, str]:
        record = self.dataset.records[i]
        return question_parts(record.question, record.options)

    def document(self, i: int) -> np.ndarray:
        """The record's context as token ids (tokenised once, cached by record id)."""
        record = self.dataset.records[i]
        if record.id not in self._documents:
            text = read_context(record, self.dataset.folders[i])
            self._documents[record.id] = np.asarray(self.tokenizer.encode(text), np.int32)
        return self._documents[record.id]

    def _rollout(self, model, indices, group_size: int, *, seed: int):
        rollout = run(
            model,
            self.tokenizer,
            [self.question(i) for i in indices],
            [self.document(i) for i in indices],
            self.agent,
            samples_per_question=group_size,
            seed=seed,
        )
        return rollout, list(rollout.answers), rollout

    def row_count(self, conversations: int) -> int:
        """Rows of the step batch: a length bucket of the conversation count, rounded up so that each of the
        ``rl.updates_per_batch`` mini-batches splits into whole micro-batches (or whole device shards)."""
        micro = self.config.train.micro_batch_size or jax.device_count()
        return round_up(length_bucket(conversations, minimum=1), self.config.rl.updates_per_batch * micro)

    def step(self, step: int, params, opt_state):
        cfg, g = self.config, self.config.rl.group_size
        start = time.perf_counter()
        indices = next(self.sampler)
        model = self.policy.model(params, self.rest)
        rollout = self._rollout(model, indices, g, seed=step_seed(cfg.seed, step))[0]
        rollout_time = time.perf_counter() - start
        rows_idx = np.repeat(indices, g)
        rewards_n = np.asarray(
            [score(self.dataset, i, t, rule=cfg.rl.reward) for i, t in zip(rows_idx, rollout.answers, strict=True)],
            np.float32,
        )
        task_n = np.asarray([self.dataset.task_ids[i] for i in rows_idx], np.int32)
        conv = conversations(rollout)
        (adv_b, rewards_b, keep_b), keep_n = trajectory_values(cfg.rl, rollout, conv, rewards_n, task_n)
        rows = pad_rows(conv.prompts, conv.responses, pad_id=self.tokenizer.pad_id)
        total = self.row_count(len(conv))
        rows = pad_row_count(rows, total, self.tokenizer.pad_id)
        adv_b, rewards_b, keep_b = (np.pad(x, (0, total - len(conv))) for x in (adv_b, rewards_b, keep_b))
        update_start = time.perf_counter()
        params, opt_state, out = self.policy_update(rows, params, opt_state, adv_b, rewards_b, keep_b)
        skipped = out.pop("skipped_reason", None)
        now = time.perf_counter()
        lengths_c = np.array([len(r) for r in conv.responses])
        update_c = ~conv.final_c
        generated = int(lengths_c.sum())
        metrics = {
            "reward/mean": float(rewards_n.mean()),
            "accuracy/mean": float((rewards_n >= 1).mean()),
            "dynamic_sampling/kept_fraction": float(keep_n.mean()),
            "memory/turns": float(rollout.num_chunks.mean()),
            "memory/conversations": float(len(conv)),
            "memory/document_tokens": float(rollout.document_tokens.mean()),
            "memory/update_length": float(lengths_c[update_c].mean()) if update_c.any() else 0.0,
            "response_length/mean": float(lengths_c[conv.final_c].mean()),
            "response_length/truncated_fraction": float(1.0 - rollout.stopped[rollout.valid].mean()),
            "tokens_per_s": float(rollout.document_tokens.sum() + generated) / (now - start),
            "step_time_s": now - start,
            "rollout_time_s": rollout_time,
            "update_time_s": now - update_start,
            **out,
        }
        metrics |= per_task_metrics(self.dataset.task_types, task_n, rewards_n)
        return params, opt_state, metrics, skipped
