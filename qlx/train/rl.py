"""One RL step of the recipe (docs/recipe.md section 2; DESIGN.md "The flow of one RL step").

    P prompts, an equal share per task type            (qlx.rl.TaskBalancedSampler)
    -> G rollouts each, sampler log-probs discarded     (qlx.rollout.generate on the live parameters: no copy)
    -> rewards r[P·G] from each task type's verifier    (qlx.rl.rewards; optional judge endpoint)
    -> advantages A[P·G]                                (task-level std, GRPO or Dr.GRPO)
    -> log-probs and entropy of the rollouts under the current parameters at the rollout temperature
    -> drop zero-variance groups (dynamic sampling, optional)
    -> AEPO: batch entropy updates the hysteresis state; while negatives are off, samples with A ≤ 0 or r ≤ 0 leave
       the batch (and the token-mean denominator)
    -> policy loss −Σ m·A·ρ / Σ m over the whole step, micro-batched; one optax AdamW step per batch (or
       ``rl.updates_per_batch`` steps on equal mini-batches, with the PPO clip against the pre-update log-probs)

Metric ``entropy`` is the batch entropy AEPO acts on (token mean over the rollouts left after dynamic sampling);
``entropy/all_rollouts`` is the token mean over every rollout of the step, comparable between runs with and
without dynamic sampling.

The random stream of step s is ``(seed, s)``; the sampler and AEPO states are checkpointed, so the batches, rollouts
and updates of a resumed run are those of the uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from qlx import rl
from qlx.config import Config, ConfigError, RLConfig
from qlx.distributed import to_host
from qlx.models.sharding import Layout
from qlx.rollout.buckets import length_bucket, round_up
from qlx.rollout.continuous import EngineConfig, generate_groups
from qlx.rollout.engine import SamplingSpec, generate
from qlx.rollout.kv_pages import pages_for
from qlx.train.batches import ROUTING, batch_shards, micro_batches, pad_rows, put_micro_batches
from qlx.train.evaluate import exact_score
from qlx.train.inputs import Dataset
from qlx.train.step import Policy, forward_logprobs, make_train_step, nonfinite_reason

log = logging.getLogger(__name__)

REFILTER_FILE = "refilter.json"


def rl_loss_sum(logp_br, entropy_br, batch, *, clip_low: float, clip_high: float):
    """The policy loss as a token sum (``qlx.rl.policy_loss`` numerator) plus clip-fraction and entropy sums."""
    mask_br = batch["mask_br"]
    _, m = rl.policy_loss(
        logp_br,
        batch["old_logp_br"],
        batch["advantages_b"],
        mask_br,
        clip_low=clip_low,
        clip_high=clip_high,
        denominator=1.0,
    )
    tokens = m["token_count"]
    return m["loss_numerator"], {
        "clipfrac_sum": m["pg_clipfrac"] * tokens,
        "clipfrac_lower_sum": m["pg_clipfrac_lower"] * tokens,
        "entropy_sum": jnp.sum(entropy_br * mask_br),
    }


def continuous_config(rollout, prompts, max_new_tokens: int, group_size: int, model) -> EngineConfig:
    """The continuous engine's shapes for a step (``rollout.engine = continuous``): ``rollout.slots`` slots of
    ``rollout.page_size``-token pages, sequences up to the longest prompt + max_new_tokens (rounded up to a length
    bucket, so steps share compilations), ``rollout.kv_tokens`` of KV (0: every slot's longest sequence; at least
    one whole group's worst case, G + 1 such sequences)."""
    if rollout.slots < group_size:
        raise ConfigError("rollout.slots", f"must hold a whole group (rl.group_size {group_size}), got {rollout.slots}")
    longest = length_bucket(max(len(p) for p in prompts) + max_new_tokens)
    max_len = min(round_up(longest, rollout.page_size), model.config.max_position_embeddings)
    kv_tokens = max(rollout.kv_tokens or rollout.slots * max_len, (group_size + 1) * max_len)
    return EngineConfig(
        max_slots=rollout.slots,
        page_size=rollout.page_size,
        num_pages=pages_for(kv_tokens, rollout.page_size) + 1,
        burst=rollout.burst,
        max_len=max_len,
        prefill_chunk=min(512, length_bucket(max(len(p) for p in prompts))),
    )


def routing_rows(routed_nsmk: np.ndarray, length: int) -> np.ndarray:
    """``GenerateResult.routed_experts`` [N, S, M, k] (position p of prompt + response) as the rows of
    :func:`qlx.train.batches.pad_rows` (the same positions, T = ``length``): cut or padded with -1 to [N, T, M, k]."""
    n, s = routed_nsmk.shape[:2]
    if s >= length:
        return routed_nsmk[:, :length]
    return np.pad(routed_nsmk, ((0, 0), (0, length - s), (0, 0), (0, 0)), constant_values=-1)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """The rollout seed of ``step``: a 32-bit value drawn from (seed, stream, step); stream 1 is the re-filter's."""
    return int(np.random.SeedSequence([seed, stream, step]).generate_state(1)[0])


def score(dataset: Dataset, index: int, response: str, *, rule: str = "recipe") -> float:
    """Reward of ``response`` for record ``index``: its task type's verifier (rule only), or exact match."""
    record = dataset.records[index]
    if rule == "exact":
        return exact_score(record, response)
    options = {}
    if record.task_type == "dialogue":
        options["prefix"] = record.evidence.get("program", {}).get("prefix", "")
    return rl.rewards.reward(record.task_type, response, record.answer, question=record.question, **options)


def advantages(config: RLConfig, rewards_n: np.ndarray, group_n: np.ndarray, task_n: np.ndarray) -> np.ndarray:
    """float32 [N]: the advantage of each of N rollouts (``rl.advantage``): "task" (r − group mean) / (std of the
    task's rewards in the batch + eps), "group" GRPO, "group_mean" r − group mean (``qlx.rl.advantages``)."""
    if config.advantage == "task":
        adv_n = rl.task_advantages(rewards_n, group_n, task_n)
    else:
        adv_n = rl.group_advantages(rewards_n, group_n, scale="std" if config.advantage == "group" else "none")
    return np.asarray(adv_n, np.float32)


def zero_variance_groups(rewards_n: np.ndarray, group_size: int) -> np.ndarray:
    """bool [N]: True for the rollouts of groups whose G rewards are all equal."""
    groups = rewards_n.reshape(-1, group_size)
    flat = np.all(groups == groups[:, :1], axis=1)
    return np.repeat(flat, group_size)


def group_statistics(config: RLConfig, rewards_n, group_n, task_n, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(A_n, keep_n) of N rollouts in contiguous groups of ``group_size``: :func:`advantages`, and keep_n False for
    the rollouts of zero-variance groups under ``rl.dynamic_sampling`` (else all True)."""
    adv_n = advantages(config, rewards_n, group_n, task_n)
    keep_n = np.ones(len(rewards_n), bool)
    if config.dynamic_sampling:
        keep_n &= ~zero_variance_groups(rewards_n, group_size)
    return adv_n, keep_n


def per_task_metrics(task_types, task_n, rewards_n, lengths_n=None) -> dict[str, float]:
    """reward/<task>, accuracy/<task> (reward >= 1) and, given lengths, response_length/<task>: means over the rows
    of each task present in the batch (task_n: [N] task index of each row)."""
    out = {}
    for t, name in enumerate(task_types):
        here = task_n == t
        if here.any():
            out[f"reward/{name}"] = float(rewards_n[here].mean())
            out[f"accuracy/{name}"] = float((rewards_n[here] >= 1).mean())
            if lengths_n is not None:
                out[f"response_length/{name}"] = float(lengths_n[here].mean())
    return out


class RLJob:
    """The RL step of the recipe, with its checkpointed state (sampler, AEPO) and the optional difficulty re-filter."""

    def __init__(
        self,
        config: Config,
        dataset: Dataset,
        policy: Policy,
        rest,
        optimizer,
        layout: Layout,
        *,
        run_dir,
        shardings=None,
    ):
        self.config, self.full_dataset, self.policy, self.rest = config, dataset, policy, rest
        self.layout, self.run_dir = layout, Path(run_dir)
        self.tokenizer = dataset.builder.tokenizer
        self.dataset = dataset
        self.sampler: rl.TaskBalancedSampler | None = None
        self.aepo = rl.AEPOState()
        loss_sum = functools.partial(rl_loss_sum, clip_low=config.rl.clip_low, clip_high=config.rl.clip_high)
        self.train_step = make_train_step(
            policy,
            optimizer,
            loss_sum,
            temperature=config.rollout.temperature,
            chunk=config.rl.logprob_chunk,
            shardings=shardings,
        )

    # -- state -----------------------------------------------------------------------------------------------------

    def extra_state(self) -> dict:
        return {"aepo": self.aepo}

    def meta(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load(self, extra: dict, meta: dict) -> None:
        self.aepo = extra["aepo"]
        kept = self._load_refilter()
        self._use(kept)
        self.sampler.load_state_dict(meta["sampler"])

    def begin(self, params) -> None:
        kept = self._load_refilter()
        if kept is None and self.config.data.refilter_k > 0:
            kept = self._refilter(params)
        self._use(kept)

    def _use(self, kept: list[int] | None) -> None:
        self.dataset = self.full_dataset if kept is None else self.full_dataset.subset(kept)
        types = [self.dataset.task_types[t] for t in self.dataset.task_ids]
        tasks = [t for t in self.dataset.task_types if t in set(types)]
        self.sampler = rl.TaskBalancedSampler(types, self.config.train.batch_size, seed=self.config.seed, tasks=tasks)

    # -- difficulty re-filter ----------------------------------------------------------------------------------------

    def _load_refilter(self) -> list[int] | None:
        path = self.run_dir / REFILTER_FILE
        return json.loads(path.read_text())["kept"] if path.is_file() else None

    def _refilter(self, params) -> list[int]:
        """Keep records whose pass rate over ``refilter_k`` samples lies in [min_pass_rate, max_pass_rate]."""
        data, k = self.config.data, self.config.data.refilter_k
        model = self.policy.model(params, self.rest)
        rates = []
        batch = max(1, self.config.train.batch_size)
        for start in range(0, len(self.full_dataset), batch):
            indices = list(range(start, min(start + batch, len(self.full_dataset))))
            texts = self._rollout(model, indices, k, seed=step_seed(self.config.seed, start, stream=1))[1]
            rewards = np.asarray(
                [
                    score(self.full_dataset, i, t, rule=self.config.rl.reward)
                    for i, t in zip(np.repeat(indices, k), texts, strict=True)
                ]
            )
            rates.extend((rewards.reshape(-1, k) >= 1.0).mean(axis=1).tolist())
        kept = [i for i, p in enumerate(rates) if data.min_pass_rate <= p <= data.max_pass_rate]
        if not kept:
            raise RuntimeError(
                f"difficulty re-filter kept no record (pass rates over {k} samples: min {min(rates):.2f}, "
                f"max {max(rates):.2f}; kept range [{data.min_pass_rate}, {data.max_pass_rate}])"
            )
        tmp = self.run_dir / (REFILTER_FILE + ".tmp")
        tmp.write_text(json.dumps({"k": k, "pass_rates": rates, "kept": kept}))
        tmp.replace(self.run_dir / REFILTER_FILE)
        log.info("difficulty re-filter: kept %d of %d records", len(kept), len(rates))
        return kept

    # -- the step ----------------------------------------------------------------------------------------------------

    def _rollout(self, model, indices, group_size: int, *, seed: int):
        prompts = [self.dataset.prompt(i) for i in indices]
        ro, new_tokens = self.config.rollout, self.config.data.max_output_tokens
        if ro.engine == "continuous":  # the same random streams as ``generate``: row i = prompt i // G, stream i
            specs = [
                [
                    SamplingSpec(
                        max_new_tokens=new_tokens,
                        temperature=ro.temperature,
                        top_p=ro.top_p,
                        top_k=ro.top_k,
                        stop_token_ids=(self.tokenizer.eos_id,),
                        seed=seed,
                        stream=i * group_size + g,
                    )
                    for g in range(group_size)
                ]
                for i in range(len(prompts))
            ]
            result = generate_groups(
                model,
                prompts,
                specs,
                continuous_config(ro, prompts, new_tokens, group_size, model),
                record_routing=self.config.rl.routing_replay,
            )
        else:
            result = generate(
                model,
                [p for p in prompts for _ in range(group_size)],
                max_new_tokens=new_tokens,
                temperature=ro.temperature,
                top_p=ro.top_p,
                top_k=ro.top_k,
                stop_token_ids=[self.tokenizer.eos_id],
                seed=seed,
                return_logprobs=False,
                max_sequences=ro.max_sequences,
                return_routing=self.config.rl.routing_replay,
            )
        responses = result.sequences()
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        return responses, texts, result

    def step(self, step: int, params, opt_state):
        cfg, g = self.config, self.config.rl.group_size
        start = time.perf_counter()
        indices = next(self.sampler)
        model = self.policy.model(params, self.rest)
        responses, texts, result = self._rollout(model, indices, g, seed=step_seed(cfg.seed, step))
        rollout_time = time.perf_counter() - start
        rows_idx = np.repeat(indices, g)
        rewards_n = np.asarray(
            [score(self.dataset, i, t, rule=cfg.rl.reward) for i, t in zip(rows_idx, texts, strict=True)], np.float32
        )
        task_n = np.asarray([self.dataset.task_ids[i] for i in rows_idx], np.int32)
        group_n = np.repeat(np.arange(len(indices), dtype=np.int32), g)
        adv_n, keep_n = group_statistics(cfg.rl, rewards_n, group_n, task_n, g)

        prompts = [self.dataset.prompt(i) for i in rows_idx]
        rows = pad_rows(prompts, responses, pad_id=self.tokenizer.pad_id)
        if cfg.rl.routing_replay:
            rows[ROUTING] = routing_rows(result.routed_experts, rows["tokens_bt"].shape[1])
        update_start = time.perf_counter()
        params, opt_state, out = self.policy_update(rows, params, opt_state, adv_n, rewards_n, keep_n)
        skipped = out.pop("skipped_reason", None)
        now = time.perf_counter()
        lengths = result.lengths
        metrics = {
            "reward/mean": float(rewards_n.mean()),
            "accuracy/mean": float((rewards_n >= 1).mean()),
            "dynamic_sampling/kept_fraction": float(keep_n.mean()),
            "response_length/mean": float(lengths.mean()),
            "response_length/truncated_fraction": float(np.mean([r == "length" for r in result.finish_reasons])),
            "tokens_per_s": float(sum(len(p) for p in prompts) + lengths.sum()) / (now - start),
            "step_time_s": now - start,
            "rollout_time_s": rollout_time,
            "update_time_s": now - update_start,
            **out,
        }
        metrics |= per_task_metrics(self.dataset.task_types, task_n, rewards_n, lengths_n=lengths)
        return params, opt_state, metrics, skipped

    def policy_update(self, rows: dict, params, opt_state, adv_b, rewards_b, keep_b):
        """The update of one rollout batch of B rows (``pad_rows`` arrays, one per sample; rows whose ``keep_b`` is
        False and rows with an all-zero mask count for nothing): log-probs and entropy under the current parameters
        (micro-batched, packed with ``train.packing``), the AEPO state from the batch entropy of the kept rows,
        AEPO's keep rule per row with (``adv_b``, ``rewards_b``), then :meth:`_update`. Returns (params, opt_state,
        metrics: loss, entropy, aepo/..., padding_fraction)."""
        cfg = self.config
        rows = {**rows, "advantages_b": np.asarray(adv_b, np.float32)}
        batch = self._micro_batches(rows)
        old_logp, entropy = map(
            to_host,
            forward_logprobs(
                params,
                self.rest,
                put_micro_batches(batch.arrays, self.layout),
                policy=self.policy,
                temperature=cfg.rollout.temperature,
                chunk=cfg.rl.logprob_chunk,
            ),
        )
        n = len(rows["tokens_bt"])
        old_logp_br, entropy_br = batch.per_sample(old_logp), batch.per_sample(entropy)
        h_all = float(rl.batch_entropy(entropy_br, rows["mask_br"]))
        rows["mask_br"] = rows["mask_br"] * keep_b[:, None]
        h_batch = float(rl.batch_entropy(entropy_br, rows["mask_br"]))
        if cfg.rl.aepo:
            self.aepo = rl.aepo_update(self.aepo, h_batch, h_low=cfg.rl.h_low, h_high=cfg.rl.h_high)
            aepo_keep_b = np.asarray(rl.aepo_keep_mask(adv_b, rewards_b, self.aepo.negatives_on))
        else:
            aepo_keep_b = np.ones(n, bool)
        rows["mask_br"] *= aepo_keep_b[:, None]
        rows["old_logp_br"] = old_logp_br
        params, opt_state, out = self._update(rows, params, opt_state)
        metrics = {
            "entropy": h_batch,
            "entropy/all_rollouts": h_all,
            "aepo/negatives_on": float(bool(self.aepo.negatives_on)),
            "aepo/kept_fraction": float((aepo_keep_b & keep_b).sum() / max(keep_b.sum(), 1)),
            "aepo/h_low": cfg.rl.h_low,
            "aepo/h_high": cfg.rl.h_high,
            "padding_fraction": batch.padding_fraction,
            **out,
        }
        return params, opt_state, metrics

    def _micro_batches(self, rows: dict, *, coarse: bool = False):
        """:func:`qlx.train.batches.micro_batches` of per-sample rows, packed with ``train.packing``."""
        train = self.config.train
        return micro_batches(
            rows,
            train.micro_batch_size,
            pad_id=self.tokenizer.pad_id,
            packing=train.packing,
            row_length=self.config.train.packed_length,
            batch_multiple=batch_shards(self.layout),
            coarse=coarse,
        )

    def _update(self, rows: dict, params, opt_state):
        """``rl.updates_per_batch`` optimizer steps on equal mini-batches of the rows; returns metrics.

        Rows whose mask is all zero (dropped by dynamic sampling or AEPO) leave the mini-batch before it is packed:
        they add nothing to the loss or the gradient, and with dynamic sampling they are most of the batch. The live
        row count then differs from step to step, so the packed micro-batches take power-of-two shapes (``coarse``):
        a few compiled update programs per run rather than one per step."""
        cfg = self.config
        n = len(rows["tokens_bt"])
        size = n // cfg.rl.updates_per_batch
        sums = {"loss": 0.0, "grad_norm": 0.0, "clip/fraction": 0.0, "clip/lower_fraction": 0.0}
        reasons = []
        tokens_total = float(rows["mask_br"].sum())
        for u in range(cfg.rl.updates_per_batch):
            part = {name: array[u * size : (u + 1) * size] for name, array in rows.items()}
            denominator = np.float32(part["mask_br"].sum())
            if denominator == 0:
                continue
            live = part["mask_br"].any(axis=1)
            part = {name: array[live] for name, array in part.items()}
            micro = self._micro_batches(part, coarse=True).arrays
            params, opt_state, out = self.train_step(
                params, opt_state, self.rest, put_micro_batches(micro, self.layout), denominator
            )
            reason = nonfinite_reason(out)
            if reason:
                reasons.append(reason)
            weight = float(denominator) / tokens_total
            sums["loss"] += float(out["loss"]) * weight
            sums["grad_norm"] += float(out["grad_norm"]) / cfg.rl.updates_per_batch
            sums["clip/fraction"] += float(out["clipfrac_sum"]) / tokens_total
            sums["clip/lower_fraction"] += float(out["clipfrac_lower_sum"]) / tokens_total
        sums["update/tokens"] = tokens_total
        if reasons:
            sums["skipped_reason"] = "; ".join(reasons)
        return params, opt_state, sums
