"""Per-device memory plan of a config's RL step on a target (a TPU topology or N GPUs): what each item costs, the
peak, whether it fits, and what would make it fit.

Items, per device (bytes; arrays divided by the mesh axes the logical-axis rules give them, as the model shards them):

    parameters        Σ over tensors of size / shards × itemsize(param_dtype)               (exact)
    optimizer state   Adam first and second moments: 2 × parameters                          (exact)
    gradients         the micro-batch gradient and its accumulator: 2 × parameters (1 × with one micro-batch)
    gathered weights  FSDP all-gathers: two decoder layers' weights (the one computing, the next one prefetched)
                      unsharded over the parameter axes, in the compute dtype, plus the LM head
    activations       per decoder layer, the tensors the ``model.remat`` policy keeps on the device
                      (:data:`KEPT_ACTIVATIONS` of activation_widths, per token) for the micro-batch's local tokens,
                      × L; plus one layer's full set (its backward: recomputed, or its cotangents)
    attention         the "reference" backend's float32 scores and weights (H × visible keys per token, causal
                      chunks as :func:`qlx.models.attention.chunk_bounds`): one layer's in the backward, and every
                      layer's saved with remat "none"; flash and ring save O(T): XLA's blockwise kernel (CPU, GPU
                      estimate) holds a few float32 score tiles of one layer, the Pallas TPU kernel none in HBM
    MoE buffers       per MoE layer: the T·k routed copies (x, fused gate/up, activation, expert output) and the
                      float32 router probabilities [T, E]; the blocked (CPU) backend adds a compute-dtype copy
                      of the layer's experts; expert parallelism adds one layer's backward over its receive
                      buffer of C rows: C × (5·D + 3·I) × itemsize (:func:`expert_parallel_rows`)
    log-prob set      :func:`qlx.rl.token_logprobs_and_entropy` on this device's n = b·R / shards response tokens
                      (``qlx.train.step.logprob_token_axes``: every mesh axis that divides b·R): the hidden
                      [n, D], its float32 gradient, a few float32 [chunk, vocab_chunk] tiles
    batch             the step's token, mask, advantage and old-log-prob arrays
    rollout KV cache  2 × L × B × S × KV × head_dim × itemsize(dtype), B sequences of S slots (the engine's
                      buckets), divided by the batch, sequence and kv-head shards. With the G samples of a prompt
                      sharing its prompt's cache: P × prompt + P·G × response slots instead of P·G × (prompt +
                      response) (the engine does not share today; the plan shows the saving)
    rollout working   the decode step's float32 logits [B, V] and sampling buffers, one prefill chunk's layer

Training peak = state (parameters + optimizer) + batch + gradients + gathered + activations + attention + MoE +
log-prob set. Rollout peak = state + KV cache + weights in the compute dtype (the engine casts them per call) +
rollout working set. The plan's peak is the larger; it fits when it is below the device's memory less a headroom.

Every per-layer item is a per-layer amount × L, so a plan of the 48-layer model is exact arithmetic even where a
compile uses fewer layers and scales. Checked against XLA's ``memory_analysis`` on CPU (tests/test_train_plan.py):
within 6% for the reference attention backend with remat none / full, dense and MoE, fsdp and tensor meshes; the
XLA blockwise flash kernel's temporaries are under-counted (the estimate is 17-29% low on CPU for it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from qlx.config import Config, ConfigError
from qlx.mesh import axis_rules, resolve_sizes, spec_axes
from qlx.models import build_model
from qlx.models.attention import chunk_bounds
from qlx.models.cache import CACHE_AXES
from qlx.models.moe_ep import EXPERT_AXIS, receive_capacity, resolve_transport
from qlx.models.sharding import spec_for
from qlx.models.stacking import STACKED_KEY, UNROLLED_KEY
from qlx.train.aot import rollout_shapes, train_shapes
from qlx.train.step import logprob_token_axes

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Device:
    """An accelerator: name, memory per device (bytes), platform ("tpu" or "gpu")."""

    name: str
    memory_bytes: int
    platform: str


DEVICES: dict[str, Device] = {
    "v5p": Device("TPU v5p", 95 * GIB, "tpu"),
    "v5e": Device("TPU v5e", 16 * GIB, "tpu"),
    "v6e": Device("TPU v6e", 32 * GIB, "tpu"),
    "h100": Device("H100", 80 * 10**9, "gpu"),
    "h200": Device("H200", 141 * 10**9, "gpu"),
}

HEADROOM = 0.06
"""Fraction of device memory left free (XLA runtime, fragmentation, collectives' buffers)."""

_QKV = ("q", "k", "v")
KEPT_ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "none": ("*",),
    "full": ("input",),
    "minimal": ("input", *_QKV, "o", "gate", "up", "mlp_out", "router"),
    "minimal_with_context": ("input", *_QKV, "attn_out", "o", "gate", "up", "mlp_out", "router"),
    "save_dot_with_context_except_mlp": ("input", *_QKV, "attn_out", "o"),
    "save_dot_except_mlpwi": ("input", *_QKV, "o", "mlp_out"),
    "save_dot_except_mlp": ("input", *_QKV, "o"),
    "save_qkv_proj": ("input", *_QKV),
    "save_out_proj": ("input", "o"),
    "qkv_proj_offloaded": ("input",),
    "minimal_offloaded": ("input",),
}
"""Per-layer activations each ``model.remat`` policy (``qlx.models.remat``) keeps on the device for the backward
pass ("*": all of :func:`activation_widths`). Every policy keeps the layer input (the checkpointed function's
argument); the offloaded policies keep the rest in host memory. "minimal" saves dots without batch dimensions: the
projections, not MoE's ragged_dot."""

MOE_PREFIXES = ("router", "moe_")
"""Names of :func:`activation_widths` counted as MoE buffers rather than activations."""


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the plan runs: ``devices`` of ``device``; ``topology`` (e.g. "v5p:4x4x4") for TPU slices."""

    device: Device
    devices: int
    topology: str | None = None

    @property
    def label(self) -> str:
        return f"{self.topology} ({self.devices} chips)" if self.topology else f"{self.devices} x {self.device.name}"


def parse_topology(topology: str) -> Target:
    """``"v5p:4x4x4"`` -> 64 v5p chips; the device name before the colon must be one of :data:`DEVICES`."""
    name, _, dims = topology.partition(":")
    device = DEVICES.get(name.lower())
    if device is None or device.platform != "tpu":
        tpus = ", ".join(k for k, d in DEVICES.items() if d.platform == "tpu")
        raise ValueError(f"--topology {topology!r}: unknown TPU {name!r}; valid: {tpus} (e.g. v5p:4x4x4)")
    try:
        sizes = [int(x) for x in dims.split("x")]
    except ValueError:
        sizes = []
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"--topology {topology!r}: expected chip grid like 4x4x4 after the colon")
    return Target(device, math.prod(sizes), topology)


def gpu_target(name: str, devices: int) -> Target:
    """``devices`` GPUs named ``name`` ("h100" or "h200")."""
    device = DEVICES.get(name.lower())
    if device is None or device.platform != "gpu":
        gpus = ", ".join(k for k, d in DEVICES.items() if d.platform == "gpu")
        raise ValueError(f"--device {name!r}: valid GPUs: {gpus}")
    if devices < 1:
        raise ValueError(f"--devices must be >= 1 (got {devices})")
    return Target(device, devices)


class _SizesMesh:
    """Mesh sizes alone (``spec_for`` reads only ``mesh.shape``): plans need no devices."""

    def __init__(self, sizes: Mapping[str, int]):
        self.shape = dict(sizes)


def activation_widths(config: Config) -> dict[str, tuple[int, str | None, int]]:
    """Per-layer activations of one token: name -> (elements, logical feature axis, itemsize).

    Counted from the decoder layer (``qlx.models.qwen3.DecoderLayer``): the tensors its backward pass reads.
    MoE entries are per token too (k routed copies each).
    """
    c = config.model
    act = jnp.dtype(c.dtype).itemsize
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    widths = {
        "input": (c.hidden_size, None, act),
        "attn_norm": (c.hidden_size, None, act),
        "q": (q, "heads", act),
        "k": (kv, "kv_heads", act),
        "v": (kv, "kv_heads", act),
        "q_rope": (q, "heads", act),
        "k_rope": (kv, "kv_heads", act),
        "attn_out": (q, "heads", act),
        "lse": (c.num_heads, "heads", 4),
        "o": (c.hidden_size, None, act),
        "residual": (c.hidden_size, None, act),
        "mlp_norm": (c.hidden_size, None, act),
    }
    if c.family == "qwen3_moe":
        k, i = c.num_experts_per_tok, c.moe_intermediate_size
        widths.update(
            router=(c.num_experts, None, 4),
            moe_x=(k * c.hidden_size, None, act),
            moe_gate_up=(k * 2 * i, None, act),
            moe_act=(k * i, None, act),
            moe_down=(k * c.hidden_size, None, act),
            mlp_out=(c.hidden_size, None, act),
        )
    else:
        i = c.intermediate_size
        widths.update(gate=(i, "mlp", act), up=(i, "mlp", act), act=(i, "mlp", act), mlp_out=(c.hidden_size, None, act))
    return widths


@dataclasses.dataclass(frozen=True)
class Item:
    """One line of the plan: bytes per device, the phase it belongs to, and how it was counted."""

    name: str
    bytes: int
    phase: str  # "state", "train" or "rollout"
    detail: str


@dataclasses.dataclass(frozen=True)
class Plan:
    """The per-device memory plan of ``config`` on ``target``.

    mesh: the resolved mesh sizes. items: every :class:`Item`. train_peak / rollout_peak: bytes per device of each
    phase (state included). fits: peak <= capacity (device memory less :data:`HEADROOM`). advice: what to change
    when it does not fit (or is close). estimate_only: True for GPU plans (no compile checks them here).
    """

    config_label: str
    target: Target
    mesh: dict[str, int]
    remat: str
    items: tuple[Item, ...]
    train_peak: int
    rollout_peak: int
    rollout_sequences: int
    advice: tuple[str, ...]
    estimate_only: bool

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.rollout_peak)

    @property
    def capacity(self) -> int:
        return int(self.target.device.memory_bytes * (1 - HEADROOM))

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity

    @property
    def headroom_bytes(self) -> int:
        return self.target.device.memory_bytes - self.peak

    def item(self, name: str) -> Item:
        return next(i for i in self.items if i.name == name)

    def to_dict(self) -> dict:
        return {
            "config": self.config_label,
            "target": self.target.label,
            "device": self.target.device.name,
            "device_memory_bytes": self.target.device.memory_bytes,
            "mesh": self.mesh,
            "remat": self.remat,
            "items": [dataclasses.asdict(i) for i in self.items],
            "train_peak_bytes": self.train_peak,
            "rollout_peak_bytes": self.rollout_peak,
            "rollout_sequences": self.rollout_sequences,
            "peak_bytes": self.peak,
            "capacity_bytes": self.capacity,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "advice": list(self.advice),
            "estimate_only": self.estimate_only,
        }


def _shard_bytes(shape, names, itemsize: int, mesh: _SizesMesh, rules) -> int:
    spec = spec_for(shape, names, mesh, rules)
    total = itemsize
    for size, entry in zip(shape, spec, strict=True):
        axes = spec_axes(entry)
        total *= size // math.prod(mesh.shape[a] for a in axes)
    return total


def _parameter_layout(config: Config):
    """[(shape, logical names, layer index or None)] of every parameter, from the abstract model (no weights)."""
    model = nnx.eval_shape(lambda: build_model(config.model, seed=config.seed))
    out = []
    for path, var in jax.tree.leaves_with_path(
        nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
    ):
        shape = var.get_value().shape
        names = var.get_metadata().get("out_sharding") or (None,) * len(shape)
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        if keys and keys[0] == STACKED_KEY:  # [L_r, ...]: one entry per layer of the run
            start, stop = config.model.layer_runs[keys[1]]
            out.extend((tuple(shape[1:]), tuple(names[1:]), i, keys[-1]) for i in range(start, stop))
        else:
            layer = keys[1] if keys and keys[0] == UNROLLED_KEY else None
            out.append((tuple(shape), tuple(names), layer, keys[-1]))
    return out


def expert_parallel_rows(config: Config, sizes: Mapping[str, int], rules, tokens: int) -> int:
    """Rows of one device's expert-parallel receive buffer (``qlx.models.moe_ep``), 0 without expert parallelism.

    rows C = ``receive_capacity(a, EP, model.moe_capacity_factor)`` for a = n·k assignments of the device's n =
    ``tokens`` / (batch x length x expert shards) tokens: dropless (factor None) the worst case EP·a, every source
    sending all its rows to one device. Every transport computes on C rows (dense: [EP, C / EP]; ring: the EP·n
    gathered tokens). A layer's backward holds, per row, the received x, its cotangent, the output's cotangent and
    two staging copies of it (5 x D), the fused gate/up cotangent (2 x I) and the activation (I): measured 12.25
    GiB per v5p chip at stage 1 (C = 524,288), the peak of that step.
    """
    c, ep = config.model, sizes["expert"]
    if ep == 1 or resolve_transport(c.moe_ep_transport) == "xla":
        return 0
    axes = {a for name in ("batch", "length") for a in rules.get(name, ())} | {EXPERT_AXIS}
    n = tokens // math.prod(sizes[a] for a in axes)
    return receive_capacity(n * c.num_experts_per_tok, ep, c.moe_capacity_factor)


def _gathered_rules(rules: dict) -> dict:
    """Rules of weights as a layer computes with them: FSDP axes gathered (only tensor / expert stay sharded)."""
    return {name: tuple(a for a in axes if a in ("tensor", "expert")) for name, axes in rules.items()}


def estimate(config: Config, target: Target, *, rollout_sequences: int | None = None, label: str = "") -> Plan:
    """The :class:`Plan` of ``config``'s RL step on ``target``; ``rollout_sequences`` per generate call (default:
    ``rollout.max_sequences``, else the whole step, batch_size x group_size, as ``qlx.train.rl.RLJob`` generates)."""
    c, mesh_cfg = config.model, config.mesh
    try:
        sizes = resolve_sizes(mesh_cfg.sizes(), target.devices)
    except ValueError as e:
        raise ConfigError("mesh", f"{e} (target {target.label})") from None
    mesh = _SizesMesh(sizes)
    rules = axis_rules(mesh_cfg.rules)
    policy = c.remat
    pdt, act = jnp.dtype(c.param_dtype).itemsize, jnp.dtype(c.dtype).itemsize
    layout = _parameter_layout(config)
    params = sum(_shard_bytes(s, n, pdt, mesh, rules) for s, n, _, _ in layout)
    gathered_rules = _gathered_rules(rules)
    layer_w = [
        sum(_shard_bytes(s, n, act, mesh, gathered_rules) for s, n, layer, _ in layout if layer == i)
        for i in range(c.num_layers)
    ]
    head_w = sum(_shard_bytes(s, n, act, mesh, gathered_rules) for s, n, layer, key in layout if key == "lm_head")
    if c.tie_word_embeddings:
        head_w = sum(_shard_bytes(s, n, act, mesh, gathered_rules) for s, n, layer, key in layout if key == "embed")
    shapes = train_shapes(config)
    b, t, r = shapes.micro_batch, shapes.length, shapes.window
    ring = sizes["seq"] if c.attention == "ring" else 1

    def tokens_bytes(width: int, feature: str | None, itemsize: int, length: int = t) -> int:
        return _shard_bytes((b, length, width), ("batch", "length", feature), itemsize, mesh, rules)

    widths = activation_widths(config)
    keep = KEPT_ACTIVATIONS[policy]

    def layer_bytes(names, moe: bool) -> int:
        return sum(tokens_bytes(*widths[n]) for n in names if n in widths and n.startswith(MOE_PREFIXES) == moe)

    kept = tuple(widths) if keep == ("*",) else keep
    moe_layers = c.num_moe_layers
    per_layer_kept = layer_bytes(kept, False)
    per_layer_all = layer_bytes(tuple(widths), False)  # one layer's backward (recomputed, or its cotangents)
    activations = c.num_layers * per_layer_kept + per_layer_all + 3 * tokens_bytes(c.hidden_size, None, act)

    pair_bytes = _shard_bytes((b, c.num_heads, 1), ("batch", "heads", None), 4, mesh, rules)
    if c.attention == "reference":  # float32 scores and weights of every visible (query, key) pair, saved per layer
        attn_work = 2 * pair_bytes * sum((end - start) * end for start, end in chunk_bounds(t))
        attn_saved = attn_work
    elif target.device.platform == "tpu":  # Pallas tiles live in VMEM; HBM holds O(T) (out, lse)
        attn_work = attn_saved = 0
    else:  # XLA blockwise kernel (custom_vjp saves O(T)): float32 score tiles of up to 512 keys, local queries
        t_local = t // ring if ring > 1 else _shard_bytes((1, t), (None, "length"), 1, mesh, rules)
        attn_work, attn_saved = 3 * pair_bytes * t_local * min(t_local, 512) // 2, 0
    attention = attn_work + attn_saved * (c.num_layers if policy == "none" else 0)
    moe_backend = (
        c.moe_backend if c.moe_backend != "auto" else "blocked" if target.device.platform == "cpu" else "ragged"
    )
    moe = moe_layers * layer_bytes(kept, True) + (moe_layers > 0) * layer_bytes(tuple(widths), True)
    if moe_layers and moe_backend == "blocked":  # the layer's experts split into separate compute-dtype arrays
        moe += 3 * c.num_experts * c.hidden_size * c.moe_intermediate_size * act // sizes["expert"]
    ep_rows = expert_parallel_rows(config, sizes, rules, b * t) if moe_layers else 0
    moe += ep_rows * (5 * c.hidden_size + 3 * c.moe_intermediate_size) * act
    grads = params * (2 if shapes.micro_batches > 1 else 1)
    gathered = 2 * max(layer_w, default=0) + head_w
    n_tokens = b * r // math.prod(sizes[a] for a in logprob_token_axes(sizes, rules, b * r))
    vchunk = min(4096, c.vocab_size)
    tile_rows = min(config.rl.logprob_chunk, n_tokens)
    logprob = n_tokens * c.hidden_size * (act + 4 + 4) + 3 * tile_rows * vchunk * 4
    batch_bytes = shapes.micro_batches * (
        _shard_bytes((b, t), ("batch", None), 4, mesh, rules)
        + 2 * _shard_bytes((b, r), ("batch", None), 4, mesh, rules)
    )

    seqs = min(rollout_sequences or config.rollout.max_sequences or shapes.sequences, shapes.sequences)
    batch_shards = math.prod(sizes[a] for a in rules.get("batch", ()) if seqs % sizes[a] == 0) or 1
    rs = rollout_shapes(config, sequences=seqs, batch_shards=batch_shards)
    kv_shape = (rs.batch, rs.cache, c.num_kv_heads, c.head_dim)
    kv_cache = 2 * c.num_layers * _shard_bytes(kv_shape, CACHE_AXES, act, mesh, rules)
    groups = max(1, seqs // config.rl.group_size)
    shared_slots = groups * rs.prompt + seqs * rs.out
    kv_shared = int(kv_cache * shared_slots / (rs.batch * rs.cache))
    compute_weights = sum(_shard_bytes(s, n, act, mesh, rules) for s, n, _, _ in layout) if act < pdt else 0
    decode = _shard_bytes((rs.batch, c.vocab_size), ("batch", "vocab"), 4, mesh, rules) * 4
    prefill = _shard_bytes((rs.batch, rs.chunk, 1), ("batch", None, None), 1, mesh, rules) * sum(
        w * s for w, _, s in widths.values()
    )
    rollout_work = decode + prefill

    state = params + 2 * params
    items = [
        Item("parameters", params, "state", f"{c.param_dtype}, sharded by the rules"),
        Item("optimizer state", 2 * params, "state", "Adam moments, same dtype and sharding as the parameters"),
        Item("gradients", grads, "train", f"{shapes.micro_batches} micro-batches: accumulator + micro-batch gradient"),
        Item("gathered weights", gathered, "train", "FSDP all-gather of 2 layers + LM head, compute dtype"),
        Item(
            "activations",
            activations,
            "train",
            f"remat '{policy}'"
            + f": {c.num_layers} layers x {per_layer_kept / 2**20:.1f} MiB kept"
            + f" + one layer's backward {per_layer_all / 2**20:.1f} MiB"
            + f"; micro-batch {b} x {t} tokens",
        ),
        Item(
            "attention scores",
            attention,
            "train",
            f"backend '{c.attention}'" + (f", ring of {ring}" if ring > 1 else ""),
        ),
        Item(
            "MoE buffers",
            moe,
            "train",
            f"{moe_layers} MoE layers: routed copies (x, gate/up, act, out), router probs; backend {moe_backend}",
        ),
        Item("log-prob working set", logprob, "train", f"window {r} tokens x {b} rows, vocab chunk {vchunk}"),
        Item("batch", batch_bytes, "train", f"{shapes.micro_batches} x {b} rows x {t} tokens"),
        Item(
            "rollout KV cache",
            kv_cache,
            "rollout",
            f"{rs.batch} sequences x {rs.cache} slots; G={config.rl.group_size} sharing the prompt: "
            f"{kv_shared / GIB:.2f} GiB",
        ),
        Item("rollout weights", compute_weights, "rollout", f"parameters cast to {c.dtype} per generate call"),
        Item("rollout working set", rollout_work, "rollout", "decode logits + one prefill chunk layer"),
    ]
    train_peak = state + sum(i.bytes for i in items if i.phase == "train")
    rollout_peak = state + sum(i.bytes for i in items if i.phase == "rollout")
    plan = Plan(
        config_label=label,
        target=target,
        mesh=sizes,
        remat=policy,
        items=tuple(items),
        train_peak=train_peak,
        rollout_peak=rollout_peak,
        rollout_sequences=seqs,
        advice=(),
        estimate_only=target.device.platform == "gpu",
    )
    return dataclasses.replace(plan, advice=tuple(advise(plan, config, kv_shared=kv_shared)))


def advise(plan: Plan, config: Config, *, kv_shared: int) -> list[str]:
    """What would bring an over-budget plan under the device's capacity, largest lever first."""
    cap, out = plan.capacity, []
    items = {i.name: i.bytes for i in plan.items}
    state = items["parameters"] + items["optimizer state"]
    n = plan.target.devices
    if state > cap:
        out.append(
            f"parameters + optimizer state alone ({state / GIB:.1f} GiB) exceed the device: shard them over more "
            f"devices (mesh.rules.embed over more axes, or more chips than {n}), or keep the Adam moments on the host"
        )
    if plan.train_peak > cap:
        top = max(("activations", "attention scores", "MoE buffers", "gradients"), key=lambda k: items[k])
        fixes = {
            "activations": "model.remat: true (keep only each layer's input)"
            if plan.remat == "none"
            else "a smaller train.micro_batch_size or a larger mesh.seq (ring attention splits each sequence)",
            "attention scores": "model.attention: flash or ring (no [T, T] scores)",
            "MoE buffers": "model.moe_capacity_factor: 2.0 (expert parallelism receives at most 2 x its own "
            "assignments per layer instead of the dropless worst case, EP x; drops are reported) or a smaller "
            "train.micro_batch_size"
            if plan.mesh.get("expert", 1) > 1 and config.model.moe_capacity_factor is None
            else "model.moe_backend: ragged (no per-layer expert copy) or mesh.expert > 1",
            "gradients": "train.micro_batch_size 0 (one micro-batch: no gradient accumulator)",
        }
        out.append(
            f"training is over by {(plan.train_peak - cap) / GIB:.1f} GiB; the largest item is {top} "
            f"({items[top] / GIB:.1f} GiB): {fixes[top]}"
        )
    if plan.rollout_peak > cap:
        kv = items["rollout KV cache"]
        per_call = kv + items["rollout working set"]  # both grow with the sequences of one generate call
        room = cap - (plan.rollout_peak - per_call)
        wave = plan.rollout_sequences
        while wave > 1 and per_call * wave / plan.rollout_sequences > room:
            wave //= 2
        hint = (
            f"generate {wave} sequences per call instead of {plan.rollout_sequences}: rollout.max_sequences={wave} "
            "(waves)"
            if per_call * wave / plan.rollout_sequences <= room
            else "more devices on the batch or seq axes, or host offload of the optimizer state during rollouts"
        )
        out.append(
            f"rollouts are over by {(plan.rollout_peak - cap) / GIB:.1f} GiB; the KV cache is {kv / GIB:.1f} GiB "
            f"({kv_shared / GIB:.1f} GiB if the G samples shared their prompt's cache): {hint}"
        )
    return out
