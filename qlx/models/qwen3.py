"""Qwen3 (dense) and Qwen3-MoE decoders in Flax NNX, numerically matching Hugging Face transformers.

Parameter layouts (logical axes in brackets; ``qlx.mesh.LOGICAL_AXIS_RULES`` maps them to mesh axes):
  embed [V, D] (vocab, embed)          lm_head [D, V] (embed, vocab), absent when tied
  attn.q [D, H, K] (embed, heads, head_dim)   attn.k / attn.v [D, KV, K] (embed, kv_heads, head_dim)
  attn.o [H, K, D] (heads, head_dim, embed)   attn.q_norm / attn.k_norm [K] (head_dim)
  mlp.gate / mlp.up [D, I] (embed, mlp)       mlp.down [I, D] (mlp, embed)
  moe.router [D, E] (embed, -)                moe.gate_up [E, D, 2, I] (experts, embed, -, mlp): gate, up
  moe.down [E, I, D] (experts, mlp, embed)    norms [D] (norm)
Unrolled (``model.scanned`` false), layer i's parameters are ``layers.{i}.…``; scanned, the layers of run r
(``ModelConfig.layer_runs``) are ``stacks.{r}.…`` with a leading [L_r] axis named "layers" (see qlx.models.stacking).
Activations are constrained as (batch, length, embed | heads | kv_heads | mlp | vocab).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from qlx.config import ModelConfig
from qlx.kernels import balance_tokens, balanced_positions, unbalance_tokens
from qlx.models.attention import attention, ring_size
from qlx.models.cache import CACHE_AXES, KVCache, PagedLayerKV, write_and_attend
from qlx.models.layers import RMSNorm, embed_tokens, normal_param, normal_value, param
from qlx.models.moe import (
    ExpertWeights,
    experts,
    load_balancing_loss,
    resolve_backend,
    route,
    router_stats,
    split_experts,
)
from qlx.models.moe_ep import (
    EXPERT_AXIS,
    ep_experts,
    ep_route,
    resolve_transport,
    token_axes,
    token_sharded_experts,
)
from qlx.models.remat import checkpoint_name, remat
from qlx.models.rope import apply_rope, rope_cos_sin, rope_frequencies
from qlx.models.sharding import Layout, state_shardings
from qlx.models.stacking import layer_location, layer_state, stack_modules

BTD = ("batch", "length", "embed")


class Attention(nnx.Module):
    """Grouped-query attention with per-head q/k RMSNorm (before RoPE), no biases."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        dtype, std = jnp.dtype(c.param_dtype), c.initializer_range
        self.config = config
        self.q = normal_param(
            rngs, (c.hidden_size, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"), std, dtype
        )
        kv_shape = (c.hidden_size, c.num_kv_heads, c.head_dim)
        self.k = normal_param(rngs, kv_shape, ("embed", "kv_heads", "head_dim"), std, dtype)
        self.v = normal_param(rngs, kv_shape, ("embed", "kv_heads", "head_dim"), std, dtype)
        self.o = normal_param(
            rngs, (c.num_heads, c.head_dim, c.hidden_size), ("heads", "head_dim", "embed"), std, dtype
        )
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, logical_axis="head_dim", param_dtype=dtype)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, logical_axis="head_dim", param_dtype=dtype)

    def __call__(self, x_btd, cos_btk, sin_btk, *, layout: Layout, segment_ids_bt=None, kv=None, positions_bt=None):
        """x [B, T, D] -> [B, T, D]; with ``kv`` (this layer's cache K, V) also returns the written (K, V)."""
        dt = x_btd.dtype
        q = layout.constrain(jnp.einsum("btd,dhk->bthk", x_btd, self.q[...].astype(dt)), BTD[:2] + ("heads", None))
        k = layout.constrain(jnp.einsum("btd,dhk->bthk", x_btd, self.k[...].astype(dt)), BTD[:2] + ("kv_heads", None))
        v = layout.constrain(jnp.einsum("btd,dhk->bthk", x_btd, self.v[...].astype(dt)), BTD[:2] + ("kv_heads", None))
        q, k, v = (
            checkpoint_name(a, n) for a, n in zip((q, k, v), ("query_proj", "key_proj", "value_proj"), strict=True)
        )
        q = apply_rope(self.q_norm(q), cos_btk, sin_btk)
        k = apply_rope(self.k_norm(k), cos_btk, sin_btk)
        backend = self.config.attention
        if kv is None:
            out = attention(q, k, v, backend=backend, causal=True, segment_ids_bt=segment_ids_bt, layout=layout)
            new_kv = None
        elif isinstance(kv, PagedLayerKV):  # a paged cache (qlx.models.cache.PagedKVCache)
            written = kv.write(k, v, positions_bt)
            out = written.attend(q, positions_bt, backend=backend)
            new_kv = (written.k, written.v)
        else:
            out, new_kv = write_and_attend(kv, q, k, v, positions_bt, backend=backend, layout=layout)
        out = checkpoint_name(layout.constrain(out, BTD[:2] + ("heads", None)), "context")
        out = layout.constrain(jnp.einsum("bthk,hkd->btd", out, self.o[...].astype(dt)), BTD)
        return checkpoint_name(out, "out_proj"), new_kv


class MLP(nnx.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        dtype, std = jnp.dtype(c.param_dtype), c.initializer_range
        self.gate = normal_param(rngs, (c.hidden_size, c.intermediate_size), ("embed", "mlp"), std, dtype)
        self.up = normal_param(rngs, (c.hidden_size, c.intermediate_size), ("embed", "mlp"), std, dtype)
        self.down = normal_param(rngs, (c.intermediate_size, c.hidden_size), ("mlp", "embed"), std, dtype)

    def __call__(self, x_btd, *, layout: Layout):
        dt = x_btd.dtype
        gate = checkpoint_name(x_btd @ self.gate[...].astype(dt), "mlpwi_0")
        h = jax.nn.silu(gate) * checkpoint_name(x_btd @ self.up[...].astype(dt), "mlpwi_1")
        h = layout.constrain(h, BTD[:2] + ("mlp",))
        return layout.constrain(h @ self.down[...].astype(dt), BTD), None


class MoE(nnx.Module):
    """Sparse MoE block: float32 softmax router, top-k (optionally renormalised), dropless SwiGLU experts."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        dtype, std = jnp.dtype(c.param_dtype), c.initializer_range
        self.config = config
        e, d, i = c.num_experts, c.hidden_size, c.moe_intermediate_size
        self.router = normal_param(rngs, (d, e), ("embed", None), std, dtype)
        # gate and up stored fused (one [D, 2I] matmul per expert, no per-call concatenation); the "2" axis keeps
        # each tensor shard's gate and up columns together. Drawn as two [E, D, I] arrays (gate, then up): the same
        # values as separately stored gate / up weights would get.
        gate_up = jnp.stack([normal_value(rngs, (e, d, i), std, dtype) for _ in range(2)], axis=2)
        self.gate_up = param(gate_up, ("experts", "embed", None, "mlp"))
        self.down = normal_param(rngs, (e, i, d), ("experts", "mlp", "embed"), std, dtype)

    def expert_weights(self, dtype) -> ExpertWeights | None:
        """The experts as separate arrays in ``dtype`` for the blocked (CPU) backend; None for the ragged one."""
        if resolve_backend(self.config.moe_backend) != "blocked":
            return None
        return split_experts(self.gate_up[...].astype(dtype), self.down[...].astype(dtype))

    def __call__(
        self,
        x_btd,
        *,
        layout: Layout,
        expert_weights: ExpertWeights | None = None,
        valid_bt: jax.Array | None = None,
        replay_btk: jax.Array | None = None,
    ):
        """x [B, T, D] -> (y [B, T, D], (assignment counts [E], router probability sums [E], drops [2]),
        experts [B, T, k] int32: the experts each token was routed to, -1 on padding).

        drops = (dropped assignments, routed assignments) of expert parallelism's capacity rule (0 dropped without
        it). On a mesh with expert > 1 the experts run in ``qlx.models.moe_ep``'s shard_map (``moe_ep_transport``);
        on a mesh without it, per token shard (``qlx.models.moe_ep.token_sharded_experts``; ``moe_ep_transport:
        xla`` leaves either to XLA's partitioner, which routes every token on every device);
        valid_bt (bool [B, T], None: all valid) marks the tokens that are routed: padding is never sent.
        expert_weights: this layer's :meth:`expert_weights` in x's dtype, precomputed (a decode loop splits once
        instead of once per step); computed here when None. Expert parallelism splits its local experts itself and
        ignores it; given on a mesh without it (the blocked backend's decode loop), the layer runs unsharded.
        replay_btk (int [B, T, k], optional): routing replay, the experts to use per token (``qlx.models.moe.route``;
        -1: the token's own top-k)."""
        c, dt = self.config, x_btd.dtype
        b, t, d = x_btd.shape
        x_td = x_btd.reshape(b * t, d)
        replay_tk = None if replay_btk is None else replay_btk.reshape(b * t, -1)
        valid_t = jnp.ones((b * t,), bool) if valid_bt is None else valid_bt.reshape(b * t)
        logits_te = jnp.matmul(x_td, self.router[...].astype(dt), preferred_element_type=jnp.float32)
        mesh = layout.mesh
        if mesh is not None and mesh.shape[EXPERT_AXIS] > 1 and resolve_transport(c.moe_ep_transport) != "xla":
            axes = token_axes(mesh, dict(layout.rules), x_btd.shape)
            weights_tk, experts_tk, probs_te = ep_route(
                logits_te, c.num_experts_per_tok, c.norm_topk_prob, mesh=mesh, token_axes=axes, replay_tk=replay_tk
            )
            y_td, drops = ep_experts(
                x_td,
                weights_tk,
                experts_tk,
                valid_t,
                self.gate_up[...].astype(dt),
                self.down[...].astype(dt),
                mesh=mesh,
                rules=dict(layout.rules),
                token_axes=axes,
                transport=c.moe_ep_transport,
                capacity_factor=c.moe_capacity_factor,
                backend=c.moe_backend,
                block_size=c.moe_block_size,
            )
        elif mesh is not None and expert_weights is None and resolve_transport(c.moe_ep_transport) != "xla":
            y_td, experts_tk, probs_te = token_sharded_experts(
                logits_te,
                x_td,
                valid_t,
                self.gate_up[...].astype(dt),
                self.down[...].astype(dt),
                top_k=c.num_experts_per_tok,
                normalize=c.norm_topk_prob,
                mesh=mesh,
                rules=dict(layout.rules),
                token_axes=token_axes(mesh, dict(layout.rules), x_btd.shape),
                backend=c.moe_backend,
                block_size=c.moe_block_size,
                replay_tk=replay_tk,
            )
            drops = jnp.stack([jnp.zeros((), jnp.float32), jnp.sum(valid_t).astype(jnp.float32) * experts_tk.shape[1]])
        else:
            weights_tk, experts_tk, probs_te = route(logits_te, c.num_experts_per_tok, c.norm_topk_prob, replay_tk)
            y_td = experts(
                x_td,
                weights_tk,
                jnp.where(valid_t[:, None], experts_tk, c.num_experts),
                self.gate_up[...].astype(dt),
                self.down[...].astype(dt),
                backend=c.moe_backend,
                block_size=c.moe_block_size,
                expert_weights=expert_weights,
            )
            drops = jnp.stack([jnp.zeros((), jnp.float32), jnp.sum(valid_t).astype(jnp.float32) * experts_tk.shape[1]])
        counts_e, prob_sums_e = router_stats(experts_tk, probs_te, valid_t)
        routed_btk = jnp.where(valid_t[:, None], experts_tk, -1).reshape(b, t, -1)
        return layout.constrain(y_td.reshape(b, t, d), BTD), (counts_e, prob_sums_e, drops), routed_btk


def valid_tokens(segment_ids_bt: jax.Array | None, positions_bt: jax.Array | None) -> jax.Array | None:
    """bool [B, T] of the real tokens: segment id > 0 (packing; 0 is padding) and position >= 0 (a KV-cache
    call's padding has position -1); None when neither is given (every token is real)."""
    valid_bt = None if segment_ids_bt is None else segment_ids_bt > 0
    if positions_bt is not None:
        valid_bt = positions_bt >= 0 if valid_bt is None else valid_bt & (positions_bt >= 0)
    return valid_bt


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x)); the MLP is MoE per ``config.is_moe_layer``."""

    def __init__(self, config: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.param_dtype)
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, logical_axis="norm", param_dtype=dtype)
        self.attn = Attention(config, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, logical_axis="norm", param_dtype=dtype)
        self.mlp = MoE(config, rngs=rngs) if config.is_moe_layer(layer_index) else MLP(config, rngs=rngs)

    def __call__(
        self,
        x_btd,
        cos_btk,
        sin_btk,
        *,
        layout,
        segment_ids_bt=None,
        kv=None,
        positions_bt=None,
        expert_weights=None,
        replay_btk=None,
    ):
        """Returns (x [B, T, D], written (K, V) or None, router stats or None, routed experts [B, T, k] or None).
        expert_weights, replay_btk: see ``MoE`` (dense layers ignore them).

        Padding tokens (:func:`valid_tokens` false) are routed to no expert: they cost no expert compute and never
        take expert parallelism's capacity from real tokens."""
        h, new_kv = self.attn(
            self.input_norm(x_btd),
            cos_btk,
            sin_btk,
            layout=layout,
            segment_ids_bt=segment_ids_bt,
            kv=kv,
            positions_bt=positions_bt,
        )
        x_btd = x_btd + h
        h = self.post_attn_norm(x_btd)
        routed = None
        if isinstance(self.mlp, MoE):
            valid_bt = valid_tokens(segment_ids_bt, positions_bt)
            m, stats, routed = self.mlp(
                h, layout=layout, expert_weights=expert_weights, valid_bt=valid_bt, replay_btk=replay_btk
            )
        else:
            m, stats = self.mlp(h, layout=layout)
        return x_btd + checkpoint_name(m, "mlpwo"), new_kv, stats, routed


class Qwen3ForCausalLM(nnx.Module):
    """Qwen3 / Qwen3-MoE causal LM. ``model(tokens)`` -> logits [B, T, V] (float32).

    Call variants (all jit-friendly; positions default to 0..T-1, or each row's cache length onward):
      model(tokens_bt, positions_bt=None, segment_ids_bt=None)                  -> logits
      model(tokens_bt, ..., cache=cache)                                        -> (logits, cache)
      model(tokens_bt, ..., return_aux=True)                                    -> (logits, aux)
      model(tokens_bt, ..., cache=cache, return_aux=True)                       -> (logits, cache, aux)
    ``hidden_states`` takes the same arguments and returns the final-norm hidden [B, T, D] in place of logits;
    ``lm_head_weight()`` is the [D, V] output projection (the embedding transposed when tied); ``expert_weights()``
    splits the MoE experts once for a loop of calls (``hidden_states(..., expert_weights=...)``). aux is
    {"load_balancing_loss": Switch loss over all MoE layers and their real tokens (padding: segment id 0 or a
    negative position, left out), unweighted (0 for dense models),
    "moe_dropped_fraction": assignments dropped by expert parallelism's capacity (``model.moe_capacity_factor``)
    over all routed assignments of all MoE layers (0 when dropless)}.
    Segment ids restrict attention to equal ids (packing: 1, 2, ... per sample, 0 on padding, which MoE layers route
    to no expert, as tokens at a negative position); they do not combine with a cache.
    With ``model.attention="ring"`` (no cache) the forward runs sequence-parallel over the mesh axis ``seq`` (R
    devices): tokens, segment ids and positions are permuted once to the zig-zag layout of
    ``qlx.kernels.balance_tokens`` (T must divide by 2R), RoPE gets the balanced positions, and the final hidden
    states are permuted back, so outputs are in natural order. The cache path (prefill into / decode from a KV cache,
    i.e. generation) keeps the natural order and the dense reference attention for every backend.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, layout: Layout | None = None):
        c = config
        dtype, std = jnp.dtype(c.param_dtype), c.initializer_range
        self.config = config
        self.layout = Layout() if layout is None else layout
        self.embed = normal_param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), std, dtype)
        layers = [DecoderLayer(c, i, rngs=rngs) for i in range(c.num_layers)]
        if c.scanned:  # built layer by layer, then stacked: a seed gives the same weights in either layout
            self.stacks = nnx.List([stack_modules(layers[start:stop]) for start, stop in c.layer_runs])
        else:
            self.layers = nnx.List(layers)
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, logical_axis="norm", param_dtype=dtype)
        if not c.tie_word_embeddings:
            self.lm_head = normal_param(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), std, dtype)

    def lm_head_weight(self, *, cast: bool = True) -> jax.Array:
        """Output projection [D, V] in the compute dtype (the embedding transposed when embeddings are tied);
        ``cast=False``: in the parameter dtype (for a caller that casts after gathering it)."""
        w = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return w.astype(self.config.dtype) if cast else w

    def expert_weights(self) -> tuple[ExpertWeights | None, ...] | None:
        """Per layer, the MoE experts as separate arrays in the compute dtype (None for dense layers); None when no
        layer needs them (dense model, or the ragged MoE backend).

        The blocked (CPU) MoE backend runs each expert's matmul on its own array; splitting copies every expert, so
        a loop that calls ``hidden_states`` many times with the same parameters (the decode loop) computes this
        once, outside the loop, and passes it in. Without it, each call splits again."""
        dtype = jnp.dtype(self.config.dtype)
        per_layer = tuple(
            layer.mlp.expert_weights(dtype) if isinstance(layer.mlp, MoE) else None for layer in self.layer_modules()
        )
        return None if all(w is None for w in per_layer) else per_layer

    def layer_modules(self) -> list[DecoderLayer]:
        """Every decoder layer as its own module, in order (scanned: static slices of the stacks)."""
        if not self.config.scanned:
            return list(self.layers)
        split = [nnx.split(stack) for stack in self.stacks]
        out = []
        for i in range(self.config.num_layers):
            r, j = layer_location(self.config, i)
            out.append(nnx.merge(split[r][0], layer_state(split[r][1], j)))
        return out

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """Empty cache (zeros, lengths 0) for ``batch`` rows of up to ``max_len`` tokens; sharded on the mesh.

        Every K / V array is its own buffer, so the cache can be donated to a jitted step with or without a mesh."""
        c = self.config
        shape = (batch, max_len, c.num_kv_heads, c.head_dim)
        dtype = jnp.dtype(c.dtype if dtype is None else dtype)

        def make():  # one buffer per array (K and V never alias), so the cache can be donated
            return KVCache(
                k=tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers)),
                v=tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers)),
                lengths=jnp.zeros((batch,), jnp.int32),
            )

        if self.layout.mesh is None:
            return make()
        kv_sharding = self.layout.sharding(shape, CACHE_AXES)
        shardings = KVCache(
            k=(kv_sharding,) * c.num_layers,
            v=(kv_sharding,) * c.num_layers,
            lengths=self.layout.sharding((batch,), ("batch",)),
        )
        return jax.jit(make, out_shardings=shardings)()

    def hidden_states(
        self,
        tokens_bt,
        *,
        positions_bt=None,
        segment_ids_bt=None,
        cache=None,
        return_aux=False,
        expert_weights=None,
        routing_replay=None,
        return_routing=False,
    ):
        """Final-norm hidden states [B, T, D] (plus the updated cache and/or aux, as ``__call__``, then the routing).

        expert_weights: ``self.expert_weights()`` computed by the caller (see there), or None.
        return_routing: also return the experts each token was routed to, int32 [B, T, M, k] over the M MoE layers
        in order (-1 on padding tokens; M = 0 for a dense model).
        routing_replay (int [B, T, M, k], optional): route token (b, t) in MoE layer m to the experts
        ``routing_replay[b, t, m]`` (routing replay, R3: the rollout's routing, ``GenerateResult.routed_experts``;
        weights from this router's probabilities: ``qlx.models.moe.route``); -1: the token routes by its own top-k.
        """
        c, layout = self.config, self.layout
        moe_index = {i: m for m, i in enumerate(i for i in range(c.num_layers) if c.is_moe_layer(i))}
        if routing_replay is not None and routing_replay.shape[2] != len(moe_index):
            raise ValueError(
                f"routing_replay: {routing_replay.shape[2]} MoE layers in shape {routing_replay.shape}, the model "
                f"has {len(moe_index)}"
            )
        if cache is not None and segment_ids_bt is not None:
            raise ValueError("segment_ids_bt cannot be combined with a KV cache")
        b, t = tokens_bt.shape
        ring = ring_size(layout) if c.attention == "ring" and cache is None else None
        if ring is not None:
            tokens_bt = balance_tokens(tokens_bt, ring)
            segment_ids_bt = None if segment_ids_bt is None else balance_tokens(segment_ids_bt, ring)
            positions_bt = (
                jnp.broadcast_to(balanced_positions(t, ring), (b, t))
                if positions_bt is None
                else balance_tokens(positions_bt, ring)
            )
        elif positions_bt is None:
            positions_bt = cache.default_positions(t) if cache is not None else jnp.broadcast_to(jnp.arange(t), (b, t))
        inv_freq, scale = rope_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        cos_btk, sin_btk = rope_cos_sin(positions_bt, inv_freq, scale)
        x = layout.constrain(embed_tokens(self.embed[...], tokens_bt, c.dtype, layout), BTD)

        if ring is not None and routing_replay is not None:
            routing_replay = balance_tokens(routing_replay, ring)

        def replayed(m):  # the replay of MoE layer m, [B, T, k]
            return None if routing_replay is None or m is None else routing_replay[:, :, m]

        def run(graphdef, state, x, kv=None, layer_experts=None, replay_btk=None):
            layer = nnx.merge(graphdef, state)
            return layer(
                x,
                cos_btk,
                sin_btk,
                layout=layout,
                segment_ids_bt=segment_ids_bt,
                kv=kv,
                positions_bt=positions_bt,
                expert_weights=layer_experts,
                replay_btk=replay_btk,
            )

        new_k, new_v, routed = [], [], []
        counts = prob_sums = drops = None

        def add_stats(stats):
            nonlocal counts, prob_sums, drops
            if stats is not None:
                counts = stats[0] if counts is None else counts + stats[0]
                prob_sums = stats[1] if prob_sums is None else prob_sums + stats[1]
                drops = stats[2] if drops is None else drops + stats[2]

        if c.scanned and cache is None:
            for stack, (start, stop) in zip(self.stacks, c.layer_runs, strict=True):
                graphdef, state = nnx.split(stack)
                first = moe_index.get(start)
                replay = (
                    None
                    if first is None or routing_replay is None
                    else routing_replay[:, :, first : first + stop - start]
                )

                def body(x, inputs, graphdef=graphdef):
                    layer_state_, replay_btk = inputs
                    x, _, stats, routed_btk = run(graphdef, layer_state_, x, None, None, replay_btk)
                    return x, (stats, routed_btk if return_routing else None)

                xs = (state, None if replay is None else jnp.moveaxis(replay, 2, 0))
                x, (stats, routed_n) = jax.lax.scan(remat(body, c.remat, scanned=True), x, xs)
                add_stats(None if stats is None else jax.tree.map(lambda s: jnp.sum(s, axis=0), stats))
                if routed_n is not None:
                    routed.extend(routed_n)
        else:
            # Unrolled layers, and every call with a KV cache (prefill / decode keep one cache array per layer).
            for i, layer in enumerate(self.layer_modules()):
                kv = None if cache is None else cache.layer(i)
                layer_experts = None if expert_weights is None else expert_weights[i]
                graphdef, state = nnx.split(layer)
                step = functools.partial(run, graphdef)
                if cache is None:
                    step = remat(step, c.remat, scanned=False)
                x, written, stats, routed_btk = step(state, x, kv, layer_experts, replayed(moe_index.get(i)))
                if written is not None:
                    new_k.append(written[0])
                    new_v.append(written[1])
                if routed_btk is not None:
                    routed.append(routed_btk)
                add_stats(stats)
        x = self.final_norm(x)
        outputs = [x if ring is None else layout.constrain(unbalance_tokens(x, ring), BTD)]
        if cache is not None:
            outputs.append(cache.updated(new_k, new_v, positions_bt))
        if return_aux:
            loss = (
                jnp.zeros((), jnp.float32)
                if counts is None
                else load_balancing_loss(
                    counts, prob_sums, jnp.maximum(jnp.sum(counts) / c.num_experts_per_tok, 1.0), c.num_experts
                )
            )
            dropped = jnp.zeros((), jnp.float32) if drops is None else drops[0] / jnp.maximum(drops[1], 1.0)
            outputs.append({"load_balancing_loss": loss, "moe_dropped_fraction": dropped})
        if return_routing:
            k = c.num_experts_per_tok
            routing = jnp.stack(routed, axis=2) if routed else jnp.zeros((b, t, 0, k), jnp.int32)
            outputs.append(routing if ring is None else unbalance_tokens(routing, ring))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def __call__(self, tokens_bt, *, positions_bt=None, segment_ids_bt=None, cache=None, return_aux=False):
        out = self.hidden_states(
            tokens_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt, cache=cache, return_aux=return_aux
        )
        hidden = out[0] if isinstance(out, tuple) else out
        logits = jnp.einsum("btd,dv->btv", hidden, self.lm_head_weight(), preferred_element_type=jnp.float32)
        logits = self.layout.constrain(logits, ("batch", "length", "vocab"))
        return (logits, *out[1:]) if isinstance(out, tuple) else logits


CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
"""XLA options for compiling :func:`build_model`'s initialisation on CPU: the random-number program runs once, and
LLVM's optimisation of it took 3-4x longer than compiling it unoptimised (tiny-moe: 10 s against 3 s, 2-core CPU,
loaded); the weights differ from an optimised build by at most one unit in the last place."""


def build_model(config: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None, rules=None) -> Qwen3ForCausalLM:
    """A freshly initialised model (weights ~ N(0, initializer_range^2), norms 1).

    Initialisation is one jitted computation; with ``mesh``, parameters are created directly in their sharded layout
    (``out_shardings``), so the full model never sits on one device. ``rules`` overrides the logical-axis rules. On
    CPU it is compiled without backend optimisation (:data:`CPU_INIT_COMPILER_OPTIONS`).
    """
    layout = Layout.create(mesh, rules)

    def create():
        return Qwen3ForCausalLM(config, rngs=nnx.Rngs(seed), layout=layout)

    graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
    shardings = None if mesh is None else state_shardings(abstract_state, mesh, rules)
    platform = (jax.devices()[0] if mesh is None else mesh.devices.flat[0]).platform
    init = functools.partial(jax.jit, lambda: nnx.state(create()), out_shardings=shardings)
    try:
        state = init(compiler_options=CPU_INIT_COMPILER_OPTIONS if platform == "cpu" else None)()
    except ValueError as e:  # called inside a trace (nnx.eval_shape, jit): only a top-level jit takes options
        if "top-level" not in str(e):
            raise
        state = init()()
    return nnx.merge(graphdef, state)


def shard_model(model: Qwen3ForCausalLM, mesh: Mesh | None, rules=None) -> Qwen3ForCausalLM:
    """The same model with its parameters moved to ``mesh`` by the logical-axis rules (None: one device)."""
    graphdef, state = nnx.split(model)
    if mesh is None:
        state = jax.device_put(state, jax.devices()[0])
    else:
        state = jax.device_put(state, state_shardings(state, mesh, rules))
    moved = nnx.merge(graphdef, state)
    moved.layout = Layout.create(mesh, rules)
    return moved
