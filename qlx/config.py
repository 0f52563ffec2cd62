"""Typed configs: frozen dataclasses loaded from YAML with dotted command-line overrides.

``load_config(path, overrides=("model.num_layers=4",))`` reads a YAML file (which may ``include:`` other YAML files,
relative to itself, merged first), applies the overrides, and builds a :class:`Config`. Every dataclass validates
itself in ``__post_init__``; the loader adds the dotted key path, so an error reads like

    qlx.config.ConfigError: model.num_kv_heads: num_heads (32) must be a multiple of num_kv_heads (3);
    valid values: 1, 2, 4, 8, 16, 32

Unknown keys, wrong types and inconsistent values all fail before any compute starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or inconsistent. The message names the dotted key."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.detail = message
        super().__init__(f"{key}: {message}" if key else message)


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def _check_finite(config) -> None:
    """Every float field of a config dataclass is finite (``.inf`` and ``.nan`` are YAML floats too)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float):
            _check(math.isfinite(value), field.name, f"must be a finite number (got {value})")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    """YaRN RoPE scaling for contexts past the native window (Hugging Face ``rope_scaling`` with ``rope_type: yarn``).

    type: the scaling method; only "yarn" is supported.
    factor: context extension factor (e.g. 4.0 for 32K -> 128K).
    original_max_position_embeddings: the native window the model was trained with.
    beta_fast, beta_slow: YaRN ramp boundaries, in rotations (HF defaults 32 and 1).
    attention_factor: attention temperature scale; None means YaRN's default 0.1 * ln(factor) + 1.
    """

    type: Literal["yarn"] = "yarn"
    factor: float = 4.0
    original_max_position_embeddings: int = 32768
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None

    def __post_init__(self):
        _check_finite(self)
        _check(self.factor >= 1.0, "factor", f"must be >= 1 (got {self.factor})")
        _check(self.original_max_position_embeddings > 0, "original_max_position_embeddings", "must be positive")
        _check(self.beta_fast > self.beta_slow, "beta_fast", f"must exceed beta_slow ({self.beta_slow})")


REMAT_POLICIES = (
    "none",
    "full",
    "minimal",
    "minimal_with_context",
    "save_dot_with_context_except_mlp",
    "save_dot_except_mlpwi",
    "save_dot_except_mlp",
    "save_qkv_proj",
    "save_out_proj",
    "qkv_proj_offloaded",
    "minimal_offloaded",
)


ARCHITECTURE_KEYS = (
    "family",
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "num_experts",
    "moe_intermediate_size",
    "decoder_sparse_step",
    "mlp_only_layers",
    "tie_word_embeddings",
)
"""ModelConfig fields that fix parameter names and shapes: a starting checkpoint, and every model of a merge, must
agree on all of them."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Qwen3 (dense) or Qwen3-MoE decoder, in Hugging Face's terms.

    family: "qwen3" (dense SwiGLU MLP in every layer) or "qwen3_moe" (MoE blocks per decoder_sparse_step).
    vocab_size, hidden_size, num_layers: embedding rows, model width, decoder layers.
    num_heads, num_kv_heads, head_dim: grouped-query attention; num_heads must be a multiple of num_kv_heads.
    intermediate_size: width of the dense SwiGLU MLP (dense family, and MoE layers listed in mlp_only_layers).
    num_experts, num_experts_per_tok, moe_intermediate_size: the MoE block (qwen3_moe only).
    norm_topk_prob: renormalise the top-k router weights to sum to 1.
    decoder_sparse_step: layer i is MoE when (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers.
    mlp_only_layers: layer indices that use the dense MLP even in a MoE model.
    router_aux_loss_coef: weight of the Switch-style load-balancing loss; 0 turns it off (the RL default).
    rms_norm_eps: epsilon of every RMSNorm (layer norms and per-head q/k norms).
    rope_theta: RoPE base frequency.
    rope_scaling: optional YaRN scaling (see RopeScalingConfig); None is plain RoPE.
    max_position_embeddings: longest position the model is configured for.
    tie_word_embeddings: share the input embedding with the LM head.
    attention: attention backend of the model's single dispatch: "reference" (dense XLA), "flash" (qlx.kernels
        flash attention), "ring" (sequence-parallel ring attention over the mesh axis "seq").
    moe_backend: expert compute: "auto" (ragged_dot on TPU/GPU, blocked sort-by-expert on CPU), "ragged", "blocked".
    moe_block_size: rows per block for the blocked MoE path.
    moe_ep_transport: expert parallelism on a mesh with expert > 1 (``qlx.models.moe_ep``): "auto" ("dense" on CPU,
        "ragged" on TPU / GPU), "ragged" (ragged_all_to_all), "ring" (all-gather tokens, psum_scatter results),
        "dense" (fixed-buffer all_to_all), "xla" (no shard_map: XLA's automatic partitioning, for comparison).
    moe_capacity_factor: expert-parallel receive buffer per device, as a multiple of its own token x top-k
        assignments; None is dropless (worst-case buffer, EP x). Overflow is dropped by a fixed rule (see
        ``qlx.models.moe_ep``) and reported as aux["moe_dropped_fraction"].
    dtype: compute dtype of activations ("float32" or "bfloat16").
    param_dtype: storage dtype of parameters.
    remat: what each decoder layer keeps for the backward pass, a policy named as MaxText names them (one of
        REMAT_POLICIES; ``qlx.models.remat`` builds them from ``checkpoint_name`` tags on the projections):
        "none" keeps every activation; "full" keeps only the layer input and recomputes the rest; "minimal" keeps
        every weight matmul output (dots without batch dimensions); "minimal_with_context" also the attention
        output; "save_dot_with_context_except_mlp" / "save_dot_except_mlpwi" / "save_dot_except_mlp" /
        "save_qkv_proj" / "save_out_proj" keep the named projections; "qkv_proj_offloaded" / "minimal_offloaded"
        move what they keep to host memory (backends with a "pinned_host" memory). true means "full" and false
        "none" (the values before policies existed).
    scan_layers: run the decoder stack as ``lax.scan`` over layer parameters stacked [L, ...] on the unsharded
        logical axis "layers" (compile time independent of depth). "auto" scans when every layer is of one kind
        (no mlp_only_layers and decoder_sparse_step 1, or a dense model) and keeps a non-uniform stack unrolled;
        true scans each run of consecutive same-kind layers (a stack per run; see ``layer_runs``); false unrolls.
    initializer_range: std of the normal initialiser for freshly built models.
    """

    family: Literal["qwen3", "qwen3_moe"] = "qwen3_moe"
    vocab_size: int = 151936
    hidden_size: int = 2048
    num_layers: int = 48
    num_heads: int = 32
    num_kv_heads: int = 4
    head_dim: int = 128
    intermediate_size: int = 6144
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e7
    rope_scaling: RopeScalingConfig | None = None
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = False
    attention: Literal["reference", "flash", "ring"] = "reference"
    moe_backend: Literal["auto", "ragged", "blocked"] = "auto"
    moe_block_size: int = 128
    moe_ep_transport: Literal["auto", "ragged", "ring", "dense", "xla"] = "auto"
    moe_capacity_factor: float | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: bool | str = "none"
    scan_layers: bool | Literal["auto"] = "auto"
    initializer_range: float = 0.02

    def __post_init__(self):
        _check_finite(self)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            _check(getattr(self, name) > 0, name, f"must be positive (got {getattr(self, name)})")
        _check(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads}); "
            f"valid values: {_divisors(self.num_heads)}",
        )
        _check(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        _check(self.rope_theta > 0, "rope_theta", "must be positive")
        _check(self.max_position_embeddings > 0, "max_position_embeddings", "must be positive")
        _check(self.moe_block_size > 0, "moe_block_size", "must be positive")
        _check(
            self.moe_capacity_factor is None or self.moe_capacity_factor > 0,
            "moe_capacity_factor",
            f"must be positive or null (dropless) (got {self.moe_capacity_factor})",
        )
        bad_layers = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        _check(not bad_layers, "mlp_only_layers", f"indices {bad_layers} outside [0, {self.num_layers})")
        if self.family == "qwen3" or self.mlp_only_layers or self.decoder_sparse_step != 1:
            _check(self.intermediate_size > 0, "intermediate_size", "dense MLP layers need a positive width")
        if self.family == "qwen3_moe":
            _check(self.num_experts > 0, "num_experts", "a qwen3_moe model needs at least one expert")
            _check(
                0 < self.num_experts_per_tok <= self.num_experts,
                "num_experts_per_tok",
                f"must be in [1, num_experts={self.num_experts}] (got {self.num_experts_per_tok})",
            )
            _check(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
            _check(self.decoder_sparse_step >= 1, "decoder_sparse_step", "must be >= 1")
        _check(self.router_aux_loss_coef >= 0, "router_aux_loss_coef", "must be >= 0")
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        _check(
            self.remat in REMAT_POLICIES,
            "remat",
            f"unknown policy {self.remat!r}; valid values: true, false, {', '.join(REMAT_POLICIES)}",
        )

    @property
    def layer_runs(self) -> tuple[tuple[int, int], ...]:
        """[start, stop) of each run of consecutive layers of one kind (dense MLP or MoE), in order."""
        runs: list[list[int]] = []
        for i in range(self.num_layers):
            if runs and self.is_moe_layer(i) == self.is_moe_layer(runs[-1][0]):
                runs[-1][1] = i + 1
            else:
                runs.append([i, i + 1])
        return tuple((start, stop) for start, stop in runs)

    @property
    def scanned(self) -> bool:
        """Whether the decoder runs scanned (``scan_layers`` resolved: "auto" scans a uniform stack)."""
        return len(self.layer_runs) == 1 if self.scan_layers == "auto" else bool(self.scan_layers)

    @property
    def num_moe_layers(self) -> int:
        """Decoder layers that use the MoE block (``is_moe_layer``); 0 for a dense model."""
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    @property
    def num_query_groups(self) -> int:
        """Query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` (0-based) uses the MoE block, exactly as Hugging Face Qwen3-MoE decides."""
        return (
            self.family == "qwen3_moe"
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )


MESH_AXES = ("data", "fsdp", "expert", "tensor", "seq")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes over the axes (data, fsdp, expert, tensor, seq); at most one may be -1 (fills the rest).

    data: batch (pure data parallelism, parameters replicated).
    fsdp: batch and parameter/optimizer-state sharding.
    expert: MoE experts.
    tensor: attention heads and MLP width.
    seq: sequence (ring attention).
    rules: optional overrides of the logical-axis rules table, as {logical_name: mesh_axis or [axes] or null}.
    """

    data: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1
    seq: int = 1
    rules: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        for axis, size in sizes.items():
            _check(size == -1 or size >= 1, axis, f"mesh size must be a positive integer or -1 (got {size})")
        fills = [axis for axis, size in sizes.items() if size == -1]
        _check(len(fills) <= 1, fills[-1] if fills else "", f"only one mesh axis may be -1 (got {fills})")

    def sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in MESH_AXES}


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """optax AdamW with global-norm gradient clipping (the recipe: constant lr 2e-6, verl's AdamW defaults).

    learning_rate: peak learning rate.
    warmup_steps: linear warm-up from 0 to learning_rate over this many optimizer steps (0: constant from step 0).
    decay_steps: after the warm-up, cosine decay from learning_rate to learning_rate × final_lr_fraction over this
        many steps, constant after that (0: no decay, the recipe's constant rate).
    final_lr_fraction: the rate at the end of the decay, as a fraction of learning_rate.
    b1, b2, eps: Adam moment decay rates and the denominator epsilon.
    weight_decay: decoupled (AdamW) weight decay.
    grad_clip: clip the global gradient norm to this value before the update; 0 turns clipping off.
    """

    learning_rate: float = 2e-6
    warmup_steps: int = 0
    decay_steps: int = 0
    final_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0

    def __post_init__(self):
        _check_finite(self)
        _check(self.learning_rate > 0, "learning_rate", f"must be positive (got {self.learning_rate})")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _check(self.decay_steps >= 0, "decay_steps", "must be >= 0 (0: no decay)")
        _check(
            0 <= self.final_lr_fraction <= 1, "final_lr_fraction", f"must be in [0, 1] (got {self.final_lr_fraction})"
        )
        _check(0 <= self.b1 < 1, "b1", f"must be in [0, 1) (got {self.b1})")
        _check(0 <= self.b2 < 1, "b2", f"must be in [0, 1) (got {self.b2})")
        _check(self.eps > 0, "eps", "must be positive")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 turns clipping off)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop: mode, length, batch, optimizer, checkpoints and logs.

    mode: "rl" (rollouts, rewards, AEPO policy update: the recipe), "sft" (cross-entropy on the answer tokens) or
        "memory" (memory-agent RL, recipe §3.2: each record's context is read chunk by chunk by ``qlx.memory.run``
        with the ``memory`` settings, G trajectories per question, and every turn of every trajectory is trained
        with its trajectory's advantage by the same policy update as "rl"; ``qlx.train.memory_rl``).
    steps: optimizer steps of this run (a resumed run continues up to this total).
    batch_size: prompts per step in rl and memory mode (each rolled out rl.group_size times); records per step in sft
        mode.
    micro_batch_size: sequences per forward/backward pass; gradients of a step's micro-batches are summed and divided
        by the token count of the whole step (exact token-mean). 0: the whole step in one pass.
    optimizer: see OptimizerConfig.
    run_dir: output folder: checkpoints/, metrics.jsonl, tensorboard/, plots/, config.yaml.
    init_from: parameters to start from: a qlx run folder or checkpoint folder (its latest good checkpoint: the
        previous stage), a Hugging Face model folder (config.json + safetensors), or None for fresh random weights.
        Ignored when run_dir already holds a checkpoint (the run resumes instead).
    restart: allow starting over in a run folder whose checkpoints cannot be resumed: when they no longer fit the
        config (shapes, tree structure, optimizer state) they are moved to checkpoints/superseded-<step>, and when
        every one failed its integrity check (already moved to checkpoints/corrupt-<step>), the run starts from step
        0 instead of stopping with an error. Checkpoints that fit are resumed as usual, so the same command continues
        an interrupted run.
    checkpoint_every: save a checkpoint every this many steps (and always after the last step).
    keep_checkpoints: how many of the newest checkpoints to keep on disk.
    async_checkpointing: write checkpoints in a background thread while training continues.
    max_nonfinite_steps: stop the run when this many steps in a row had a non-finite loss or gradient (each is
        skipped with its reason logged).
    progress: show a progress bar with ETA on stderr.
    sft_prompt_weight: sft mode: weight of the next-token loss on the prompt's tokens relative to the answer's
        (0: answer tokens only). A model trained from random weights learns to read and copy from its context much
        sooner with language-model loss on the context too.
    packing: place several samples in one row (first-fit by length into rows of a length bucket of the step's
        longest sample), each with its own segment id and positions restarting at 0, so a step computes on data
        instead of padding (qlx.train.batches). Exact: per-sample log-probs, entropies, advantages, masks and the
        token-mean denominator are those of one row per sample (false: right-pad every sample to the step's
        longest, the layout before packing). micro_batch_size then bounds the packed rows per pass.
    packed_length: tokens per packed row (0: a length bucket of the step's longest sample). Longer rows hold more
        samples and less padding but cost more attention per token; on the CPU demo's tiny model rows of 640 tokens
        were slower than rows of the longest sample (BUILD_NOTES.md, "Sequence packing").
    """

    mode: Literal["sft", "rl", "memory"] = "rl"
    steps: int = 200
    batch_size: int = 128
    micro_batch_size: int = 0
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    run_dir: str = "runs/default"
    init_from: str | None = None
    restart: bool = False
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    max_nonfinite_steps: int = 3
    progress: bool = True
    sft_prompt_weight: float = 0.0
    packing: bool = True
    packed_length: int = 0

    def __post_init__(self):
        _check_finite(self)
        _check(self.steps >= 1, "steps", f"must be >= 1 (got {self.steps})")
        _check(self.batch_size >= 1, "batch_size", f"must be >= 1 (got {self.batch_size})")
        _check(self.micro_batch_size >= 0, "micro_batch_size", "must be >= 0 (0: the whole step in one pass)")
        _check(bool(self.run_dir), "run_dir", "must name a folder")
        _check(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        _check(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1")
        _check(self.sft_prompt_weight >= 0, "sft_prompt_weight", "must be >= 0 (0: answer tokens only)")
        _check(
            self.packed_length >= 0, "packed_length", "must be >= 0 (0: a length bucket of the step's longest sample)"
        )


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The RL objective (recipe section 2): groups, advantages, AEPO, loss.

    group_size: rollouts per prompt (G; the recipe uses 8).
    advantage: "task" (r - group mean) / (unbiased std of the rewards of the same task in the batch + eps), the
        recipe; "group" GRPO (r - group mean) / (group std + eps); "group_mean" r - group mean (Dr. GRPO).
    dynamic_sampling: drop groups whose rewards are all equal (zero advantage) before the update.
    aepo: switch negative-advantage samples off while batch entropy is high (AEPO hysteresis, section 2.5).
    h_low, h_high: AEPO thresholds on the token-mean entropy of the batch: negatives go off above h_high and come
        back below h_low.
    clip_low, clip_high: PPO ratio clip range (inactive at one update per batch, where the ratio is 1).
    updates_per_batch: optimizer steps taken on each rollout batch (1: strictly on-policy, the recipe); the batch is
        split into this many equal mini-batches.
    logprob_chunk: vocabulary chunk of the log-prob/entropy computation (no [tokens, vocab] array is formed).
    reward: "recipe" scores rollouts with each task type's verifier (qlx.rl.rewards: sub-EM containment for QA,
        1% numeric tolerance, SequenceMatcher ratio for dialogue); "exact" with exact match only (the held-out
        scoring of qlx.train.evaluate), which a policy cannot game with answer fragments that sub-EM accepts.
    routing_replay: MoE models: routing replay (R3, "rollout routing replay"): the rollout engine records the
        experts it routed every token to in every MoE layer (``GenerateResult.routed_experts``) and the update's
        forward passes route each token to those experts, weighted by their own router's probabilities (so the
        router still learns): the policy log-probs are then computed with the routing that sampled the tokens,
        where a recomputation would route some tokens differently (bf16 rounding, other kernels, a changed
        batch). Costs 2·(MoE layers)·k bytes per token of host and device memory. ``train.mode: rl`` only (either
        rollout engine).
    """

    group_size: int = 8
    advantage: Literal["task", "group", "group_mean"] = "task"
    dynamic_sampling: bool = False
    aepo: bool = True
    h_low: float = 0.14
    h_high: float = 0.25
    clip_low: float = 0.2
    clip_high: float = 0.2
    updates_per_batch: int = 1
    logprob_chunk: int = 8192
    reward: Literal["recipe", "exact"] = "recipe"
    routing_replay: bool = False

    def __post_init__(self):
        _check_finite(self)
        _check(self.group_size >= 2, "group_size", f"must be >= 2 to estimate advantages (got {self.group_size})")
        _check(self.h_low >= 0, "h_low", f"must be >= 0 (got {self.h_low})")
        _check(self.h_high > self.h_low, "h_high", f"must exceed h_low ({self.h_low}) (got {self.h_high})")
        _check(0 <= self.clip_low < 1, "clip_low", f"must be in [0, 1) (got {self.clip_low})")
        _check(self.clip_high >= 0, "clip_high", "must be >= 0")
        _check(self.updates_per_batch >= 1, "updates_per_batch", "must be >= 1")
        _check(self.logprob_chunk >= 1, "logprob_chunk", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How rollouts are sampled (the recipe: temperature 0.7, top-p 0.95, top-k off).

    temperature: sampling temperature; the policy's log-probs and entropy use the same temperature.
    top_p: nucleus sampling mass (1.0: off).
    top_k: keep the k most likely tokens (0: off).
    engine: "static" (``qlx.rollout.generate``: every row of a batch runs until the longest ends) or "continuous"
        (``qlx.rollout.continuous``: decode slots refilled between bursts, a group's prompt prefilled once, paged KV).
    slots: continuous engine: sequences decoded together (a power of two).
    page_size: continuous engine: tokens per KV page.
    kv_tokens: continuous engine: KV cache size in tokens; 0: slots x (data.max_input_tokens + max_output_tokens).
    burst: continuous engine: decode steps per compiled burst between the host's admissions.
    max_sequences: static engine: sequences per generate call; a step's batch_size x group_size rollouts are
        generated in waves of this many, with the same tokens as one call (0: one call). Bounds the rollout's KV cache
        and working set to one wave's (``qlx plan`` says which value fits the device).
    """

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    engine: Literal["static", "continuous"] = "static"
    slots: int = 64
    page_size: int = 16
    kv_tokens: int = 0
    burst: int = 16
    max_sequences: int = 0

    def __post_init__(self):
        _check_finite(self)
        _check(self.temperature > 0, "temperature", f"must be positive (got {self.temperature})")
        _check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1] (got {self.top_p})")
        _check(self.top_k >= 0, "top_k", "must be >= 0 (0: off)")
        _check(
            self.slots >= 1 and self.slots & (self.slots - 1) == 0, "slots", f"must be a power of two ({self.slots})"
        )
        for key in ("page_size", "burst"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1 (got {getattr(self, key)})")
        _check(self.kv_tokens >= 0, "kv_tokens", "must be >= 0 (0: slots x the longest sequence)")
        _check(self.max_sequences >= 0, "max_sequences", "must be >= 0 (0: a step's rollouts in one call)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training records and the stage's length limits.

    train_files: JSONL record files ({id, task_type, question, answer, ...}) to train on.
    tokenizer: a Hugging Face tokenizer.json (or a folder holding one) or a sentencepiece .model file.
    max_input_tokens: longest prompt in tokens (chat template included); longer prompts are middle-truncated.
    max_output_tokens: longest response: the rollout's max_new_tokens in rl mode, the answer's limit in sft mode.
    task_types: task types in sampler order (their share of each batch is equal, the remainder going to the first);
        empty: the sorted task types found in train_files.
    chat_mode: the chat template's generation prompt: "thinking" (Qwen3 Thinking models: the response opens a
        <think> block), "instruct" (no thinking block), "no_think" (an empty thinking block, answer directly).
    refilter_k: difficulty re-filtering at the start of a stage: sample this many answers per record with the starting
        model and keep the records whose pass rate lies in [min_pass_rate, max_pass_rate]; 0 turns it off.
    min_pass_rate, max_pass_rate: the kept pass-rate range of the re-filtering.
    """

    train_files: tuple[str, ...] = ()
    tokenizer: str = ""
    max_input_tokens: int = 20480
    max_output_tokens: int = 12288
    task_types: tuple[str, ...] = ()
    chat_mode: Literal["thinking", "instruct", "no_think"] = "thinking"
    refilter_k: int = 0
    min_pass_rate: float = 0.0
    max_pass_rate: float = 1.0

    def __post_init__(self):
        _check_finite(self)
        _check(self.max_input_tokens >= 16, "max_input_tokens", f"must be >= 16 (got {self.max_input_tokens})")
        _check(self.max_output_tokens >= 1, "max_output_tokens", "must be >= 1")
        _check(len(set(self.task_types)) == len(self.task_types), "task_types", "has duplicates")
        _check(self.refilter_k >= 0, "refilter_k", "must be >= 0 (0: off)")
        _check(0 <= self.min_pass_rate <= 1, "min_pass_rate", "must be in [0, 1]")
        _check(
            self.min_pass_rate <= self.max_pass_rate <= 1,
            "max_pass_rate",
            f"must be in [min_pass_rate={self.min_pass_rate}, 1] (got {self.max_pass_rate})",
        )


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run.

    model: architecture (ModelConfig).
    mesh: device mesh (MeshConfig).
    seed: seed of parameter initialisation, data order and rollout sampling; in [0, 2**63).
    train: the training loop (TrainConfig).
    rl: the RL objective (RLConfig).
    rollout: rollout sampling (RolloutConfig).
    data: training records and length limits (DataConfig).
    memory: train.mode memory: the memory agent's settings, the keys of ``qlx.memory.MemoryAgentConfig``
        (chunk_tokens, memory_tokens, max_memory_tokens, final_tokens, max_chunks, max_question_tokens,
        max_instruction_tokens, template: a name or {update, final, no_memory}, chat_mode, carry, stop_token_ids,
        window_chunks, prefill_chunk; documented there), validated when set or in memory mode. Its sampling is the
        run's ``rollout`` section (the temperature the policy's log-probs use), so temperature, top_p and top_k are
        not keys here. See :func:`memory_agent_config`.
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    seed: int = 0
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _check(0 <= self.seed < 2**63, "seed", f"must be in [0, 2**63) (got {self.seed})")
        if self.rl.routing_replay:
            _check(
                self.train.mode == "rl",
                "rl.routing_replay",
                f"is for train.mode: rl (got {self.train.mode}; the memory agent records no routing)",
            )
        if self.memory or self.train.mode == "memory":
            memory_agent_config(self)


MEMORY_SAMPLING_KEYS = ("temperature", "top_p", "top_k")


def memory_agent_config(config: Config):
    """``config.memory`` as a validated ``qlx.memory.MemoryAgentConfig`` sampling with ``config.rollout``'s
    temperature, top_p and top_k; errors name the key (``memory.chunk_tokens: ...``)."""
    from qlx.memory.config import MemoryAgentConfig  # here, not at the top: qlx.memory imports jax

    for key in MEMORY_SAMPLING_KEYS:
        _check(key not in config.memory, f"memory.{key}", f"the memory agent samples with rollout.{key}; set that")
    rollout = config.rollout
    values = {**config.memory, "temperature": rollout.temperature, "top_p": rollout.top_p, "top_k": rollout.top_k}
    return _build(MemoryAgentConfig, values, "memory")


# --------------------------------------------------------------------------------------------------------------------
# YAML -> dataclass, with type checks that name the key.


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert YAML lists to tuples and dicts to dataclasses."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        concrete = [option for option in options if option is not type(None)]
        if len(concrete) == 1:
            return _coerce(value, concrete[0], key)
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(e.detail)
        raise ConfigError(key, " or ".join(errors))
    if origin is Literal:
        allowed = typing.get_args(tp)
        _check(value in allowed, key, f"got {value!r}; valid values: {', '.join(repr(a) for a in allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is tuple:
        _check(isinstance(value, list | tuple), key, f"expected a list, got {type(value).__name__} {value!r}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise ConfigError(key, f"expected a number, got {value!r}") from None
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        _check(ok, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported annotation {_type_name(tp)}")


def _build(cls, values: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping; unknown keys and invalid values raise ConfigError with the full key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    dotted = (prefix + ".") if prefix else ""
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(dotted + unknown[0], f"unknown key; valid keys of {cls.__name__}: {', '.join(fields)}")
    kwargs = {name: _coerce(value, hints[name], dotted + name) for name, value in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(dotted + e.key if e.key else prefix, e.detail) from None


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError("include", f"include cycle: {' -> '.join(str(p) for p in (*seen, path))}")
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: top level must be a mapping, got {type(data).__name__}")
    includes = data.pop("include", [])
    includes = [includes] if isinstance(includes, str) else includes
    merged: dict = {}
    for inc in includes:
        merged = _deep_merge(merged, _read_yaml(path.parent / inc, (*seen, path)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.num_layers=4"`` -> (["model", "num_layers"], 4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(text, "override must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(key, "override key must be a dotted path like model.num_layers")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(key, f"cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(path[: i + 1]), f"is {child!r}, not a section")
            node[part] = child = dict(child)
            node = child
        node[path[-1]] = value
    return data


def add_override_argument(parser, help_text: str = "override a config key, e.g. --set train.steps=10") -> None:
    """Add the repeatable ``--set KEY=VALUE`` option (values are YAML) to an argparse parser, as ``args.overrides``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"{help_text} (repeatable; values are YAML)",
    )


def config_from_dict(data: dict, overrides=()) -> Config:
    """Build a validated :class:`Config` from a plain mapping (as read from YAML) and dotted overrides."""
    return _build(Config, apply_overrides(data, overrides))


def load_config(path: str | Path, overrides=()) -> Config:
    """Load ``path`` (YAML, with ``include:``), apply dotted ``overrides`` like ``"model.num_layers=4"``, validate."""
    return config_from_dict(_read_yaml(Path(path)), overrides)


def to_dict(config) -> dict:
    """A dataclass config as plain YAML-ready data (tuples become lists)."""

    def plain(value):
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))
