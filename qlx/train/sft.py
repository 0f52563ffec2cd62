"""SFT: cross-entropy on the reference answer tokens of each record, for models that start from random weights and
as the warm start of RL.

Records are visited in epochs, each a permutation drawn from (seed, epoch); the iterator state (epoch, position) is
saved with every checkpoint, so a resumed run sees the same batches.
"""

from __future__ import annotations

import time

import numpy as np

from qlx.config import Config
from qlx.models.sharding import Layout
from qlx.train.batches import batch_shards, micro_batches, pad_rows, put_micro_batches
from qlx.train.inputs import Dataset
from qlx.train.step import Policy, make_train_step, nonfinite_reason, sft_loss_sum


class EpochIterator:
    """Batches of record indices, epoch after epoch, each epoch a seeded permutation."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def next_batch(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            order = self._order(self.epoch)
            take = order[self.position : self.position + self.batch_size - len(out)]
            out.extend(int(i) for i in take)
            self.position += len(take)
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class SFTJob:
    """One SFT step per call: next batch of records -> rows (packed with ``train.packing``) -> one optimizer step."""

    def __init__(
        self, config: Config, dataset: Dataset, policy: Policy, rest, optimizer, layout: Layout, *, shardings=None
    ):
        self.config, self.dataset, self.rest, self.layout = config, dataset, rest, layout
        self.pad_id = dataset.builder.tokenizer.pad_id
        self.train_step = make_train_step(
            policy, optimizer, sft_loss_sum, temperature=1.0, chunk=config.rl.logprob_chunk, shardings=shardings
        )
        self.iterator = EpochIterator(len(dataset), config.train.batch_size, config.seed)
        self.shards = batch_shards(layout)

    def extra_state(self) -> dict:
        return {}

    def meta(self) -> dict:
        return {"data_iterator": self.iterator.state_dict()}

    def load(self, extra: dict, meta: dict) -> None:
        self.iterator.load_state_dict(meta["data_iterator"])

    def begin(self, params) -> None:
        """Nothing to prepare for SFT."""

    def step(self, step: int, params, opt_state):
        start = time.perf_counter()
        indices = self.iterator.next_batch()
        limit = self.config.data.max_output_tokens
        prompts = [self.dataset.prompt(i) for i in indices]
        targets = [self.dataset.target(i)[:limit] for i in indices]
        weight = self.config.train.sft_prompt_weight
        if weight > 0:  # the loss window starts at the second prompt token; prompt tokens count with `weight`
            rows = pad_rows([p[:1] for p in prompts], [p[1:] + t for p, t in zip(prompts, targets, strict=True)],
                            pad_id=self.pad_id)  # fmt: skip
            for i, p in enumerate(prompts):
                rows["mask_br"][i, : len(p) - 1] *= weight
        else:
            rows = pad_rows(prompts, targets, pad_id=self.pad_id)
        denominator = np.float32(rows["mask_br"].sum())
        train = self.config.train
        batch = micro_batches(
            rows,
            train.micro_batch_size,
            pad_id=self.pad_id,
            packing=train.packing,
            row_length=self.config.train.packed_length,
            batch_multiple=self.shards,
        )
        params, opt_state, out = self.train_step(
            params, opt_state, self.rest, put_micro_batches(batch.arrays, self.layout), denominator
        )
        skipped = nonfinite_reason(out)
        elapsed = time.perf_counter() - start
        tokens = int(sum(len(p) + len(t) for p, t in zip(prompts, targets, strict=True)))
        metrics = {
            "loss": float(out["loss"]),
            "grad_norm": float(out["grad_norm"]),
            "entropy": float(out["entropy_sum"]) / max(float(denominator), 1.0),
            "response_length/mean": float(np.mean([len(t) for t in targets])),
            "tokens_per_s": tokens / elapsed,
            "padding_fraction": batch.padding_fraction,
            "step_time_s": elapsed,
        }
        return params, opt_state, metrics, skipped
