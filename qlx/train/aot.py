"""The real RL train step and rollout steps of a config, lowered ahead of time for any mesh (MaxText's
``train_compile``): abstract inputs (``jax.ShapeDtypeStruct`` with their ``NamedSharding``) instead of arrays, so a
CPU host compiles the program of a TPU pod slice from a topology description and reads XLA's memory analysis.

- :func:`train_shapes` / :func:`rollout_shapes`: the padded shapes the trainer and the rollout engine use for a
  config's lengths and batch (the same length buckets, so the compiled program is the one a run compiles);
- :func:`lower_train_step`: ``qlx.train.step.make_train_step`` with the RL loss of ``qlx.train.rl``, lowered on the
  mesh with the trainer's parameter and optimizer-state shardings;
- :func:`lower_rollout_steps`: the engine's last prefill chunk (the whole cache span) and its decode loop;
- :func:`compiled_stats`: argument, output, alias, temp and generated-code bytes and the FLOP count of a compile.

``target_platform("tpu")`` makes kernel and MoE dispatch (which choose by ``jax.default_backend()``) trace as on a
TPU while the host is a CPU: Pallas Mosaic attention, ragged_dot experts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from unittest import mock

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qlx.config import Config
from qlx.mesh import axis_rules
from qlx.models.cache import CACHE_AXES, KVCache
from qlx.models.sharding import Layout
from qlx.rollout import engine
from qlx.rollout.buckets import batch_bucket, length_bucket, round_up
from qlx.train.batches import SLOT_GROUPS, batch_shards, slot_groups
from qlx.train.optim import make_optimizer
from qlx.train.rl import rl_loss_sum
from qlx.train.step import make_train_step
from qlx.train.trainer import _abstract_model, _opt_state_shardings, _with_shardings


@contextlib.contextmanager
def target_platform(platform: str | None):
    """Trace as if ``jax.default_backend()`` were ``platform`` (None: the host's own), for AOT compiles."""
    if platform is None:
        yield
        return
    with mock.patch.object(jax, "default_backend", lambda: platform):
        yield


@dataclasses.dataclass(frozen=True)
class TrainShapes:
    """Padded shapes of one RL update: ``micro_batches`` x ``micro_batch`` rows of ``length`` tokens, of which the
    last ``window`` positions (a length bucket of the longest response) reach the log-prob projection.

    sequences: rollouts per step (batch_size x group_size), before padding to a multiple of the micro-batch.
    """

    sequences: int
    micro_batch: int
    micro_batches: int
    length: int
    window: int


def train_shapes(config: Config) -> TrainShapes:
    """The shapes ``qlx.train.batches.pad_rows`` + ``micro_batches`` give a step of full-length rollouts (one per
    row, packed or not)."""
    train, data = config.train, config.data
    sequences = train.batch_size * (config.rl.group_size if train.mode == "rl" else 1)
    b = sequences if train.micro_batch_size == 0 else train.micro_batch_size
    window = length_bucket(data.max_output_tokens, minimum=8)
    length = length_bucket(data.max_input_tokens + window)
    return TrainShapes(sequences, b, -(-sequences // b), length, window)


@dataclasses.dataclass(frozen=True)
class RolloutShapes:
    """Padded shapes of one ``qlx.rollout.generate`` call: ``batch`` rows (a power of two, a multiple of the batch
    shards), prompts padded to ``prompt`` (a multiple of ``chunk``), ``out`` generated tokens, a ``cache`` of slots."""

    batch: int
    prompt: int
    chunk: int
    out: int
    cache: int


def rollout_shapes(config: Config, *, sequences: int, batch_shards: int, prefill_chunk: int = 512) -> RolloutShapes:
    """The buckets :func:`qlx.rollout.engine.generate_rows` picks for ``sequences`` full-length prompts."""
    data = config.data
    chunk = min(prefill_chunk, length_bucket(data.max_input_tokens))
    prompt = round_up(data.max_input_tokens, chunk)
    out = length_bucket(data.max_output_tokens, minimum=32)
    return RolloutShapes(batch_bucket(sequences, batch_shards), prompt, chunk, out, length_bucket(prompt + out))


def abstract_state(config: Config, mesh):
    """(policy, params, rest, optimizer, opt_state): abstract, with the trainer's shardings on ``mesh``."""
    rules = axis_rules(config.mesh.rules)
    policy, params, rest = _abstract_model(config, mesh, rules)
    optimizer = make_optimizer(config.train.optimizer)
    opt_shardings = _opt_state_shardings(optimizer, params, mesh)
    opt_state = _with_shardings(jax.eval_shape(optimizer.init, params), opt_shardings)
    return policy, params, rest, optimizer, opt_state


def _sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def train_batch(shapes: TrainShapes, layout: Layout) -> dict:
    """Abstract micro-batches [M, b, ...] of the RL loss, sharded as ``qlx.train.batches.put_micro_batches`` puts
    them."""
    m, b, t, r = shapes.micro_batches, shapes.micro_batch, shapes.length, shapes.window
    fields = {
        "tokens_bt": ((m, b, t), jnp.int32),
        "segment_ids_bt": ((m, b, t), jnp.int32),
        "positions_bt": ((m, b, t), jnp.int32),
        "start_b": ((m, b), jnp.int32),
        "mask_br": ((m, b, r), jnp.float32),
        "advantages_b": ((m, b), jnp.float32),
        "old_logp_br": ((m, b, r), jnp.float32),
        SLOT_GROUPS: ((m, slot_groups(b, batch_shards(layout))), jnp.int8),  # rows grouped as micro_batches
    }
    return {
        name: _sds(shape, dtype, layout.sharding(shape, (None, "batch") + (None,) * (len(shape) - 2)))
        for name, (shape, dtype) in fields.items()
    }


def lower_train_step(config: Config, mesh, *, platform: str | None = None):
    """The RL update ``make_train_step(policy, AdamW, rl_loss_sum)`` of ``config`` lowered on ``mesh``."""
    with target_platform(platform):
        policy, params, rest, optimizer, opt_state = abstract_state(config, mesh)
        layout = Layout.create(mesh, axis_rules(config.mesh.rules))
        replicated = NamedSharding(mesh, PartitionSpec())
        shardings = (jax.tree.map(lambda a: a.sharding, params), jax.tree.map(lambda a: a.sharding, opt_state))
        loss_sum = functools.partial(rl_loss_sum, clip_low=config.rl.clip_low, clip_high=config.rl.clip_high)
        step = make_train_step(
            policy,
            optimizer,
            loss_sum,
            temperature=config.rollout.temperature,
            chunk=config.rl.logprob_chunk,
            shardings=(*shardings, replicated),
        )
        batch = train_batch(train_shapes(config), layout)
        return step.lower(params, opt_state, rest, batch, _sds((), jnp.float32, replicated))


def lower_rollout_steps(config: Config, mesh, *, sequences: int, platform: str | None = None) -> dict:
    """{"prefill": the last prefill chunk (attending over the whole prompt), "decode": the decode loop} of one
    ``generate`` call over ``sequences`` prompts of ``data.max_input_tokens``, lowered on ``mesh``."""
    with target_platform(platform):
        policy, params, rest, _, _ = abstract_state(config, mesh)
        model = policy.model(params, rest)
        graphdef, state = nnx.split(model)
        layout = model.layout
        batch_axes = engine.batch_axes(model)
        shards = 1
        for axis in batch_axes:
            shards *= mesh.shape[axis]
        s = rollout_shapes(config, sequences=sequences, batch_shards=shards)
        c = config.model
        batch_sharding = NamedSharding(mesh, PartitionSpec(batch_axes or None))

        def rows(shape, dtype):
            return _sds(
                shape, dtype, NamedSharding(mesh, PartitionSpec(batch_axes or None, *(None,) * (len(shape) - 1)))
            )

        kv_shape = (s.batch, s.cache, c.num_kv_heads, c.head_dim)
        kv = _sds(kv_shape, c.dtype, layout.sharding(kv_shape, CACHE_AXES))
        cache = KVCache(
            k=(kv,) * c.num_layers, v=(kv,) * c.num_layers, lengths=_sds((s.batch,), jnp.int32, batch_sharding)
        )
        experts = jax.eval_shape(engine._expert_weights, graphdef, state)
        hidden = rows((s.batch, c.hidden_size), c.dtype)
        lengths = rows((s.batch,), jnp.int32)
        start = s.prompt - s.chunk
        span = min(s.cache, 1 << (start + s.chunk - 1).bit_length())
        prefill = engine._prefill_chunk.lower(
            graphdef, state, experts, cache, hidden, rows((s.batch, s.chunk), jnp.int32), start, lengths, span=span
        )
        decode = engine._decode.lower(
            graphdef,
            state,
            experts,
            cache,
            hidden,
            lengths,
            lengths,
            rows((s.batch,), jnp.float32),
            rows((s.batch,), jnp.float32),
            lengths,
            rows((s.batch, 1), jnp.int32),
            rows((s.batch, 3), jnp.uint32),
            out_len=s.out,
        )
        return {"prefill": prefill, "decode": decode}


@dataclasses.dataclass(frozen=True)
class CompiledStats:
    """XLA's per-device memory analysis of a compiled program, and its FLOP count (per device).

    peak_bytes = argument + output - alias + temp: live at once when the donated inputs are reused for outputs.
    """

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    flops: float

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def compiled_stats(compiled) -> CompiledStats:
    """The :class:`CompiledStats` of a ``jax.stages.Compiled``."""
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return CompiledStats(
        argument_bytes=int(m.argument_size_in_bytes),
        output_bytes=int(m.output_size_in_bytes),
        alias_bytes=int(m.alias_size_in_bytes),
        temp_bytes=int(m.temp_size_in_bytes),
        generated_code_bytes=int(m.generated_code_size_in_bytes),
        flops=float((cost or {}).get("flops", 0.0)),
    )
