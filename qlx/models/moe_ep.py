"""Expert parallelism written out in ``jax.shard_map`` over the mesh axis ``expert``, with three transports.

Tokens arrive sharded over the token axes of the activations (the mesh axes the rules give "batch" and "length",
plus ``expert``: every device of an expert group holds different tokens); each device owns E / EP experts
(``experts`` -> ``expert``), their ``mlp`` width split over ``tensor``. Per device, with n local tokens, k experts
per token and a = n * k (token, expert) assignments:

1. route (float32, :func:`qlx.models.moe.route` per token shard: :func:`ep_route`); padding tokens (``valid_t``
   False) get no expert;
2. sort the assignments by expert (stable) with :func:`permute_rows`, a gather whose backward is the inverse
   gather (no scatter-add);
3. ``all_gather`` the per-expert counts over ``expert``: every device knows counts[r, e] of every source r;
4. apply the capacity rule (:func:`kept_counts`), then dispatch, compute, return, by one of the transports:
   - ``"dense"``: a fixed [EP, C, D] buffer (C = min(capacity, a) rows per peer) and ``all_to_all`` both ways
     (runs everywhere; what CPU tests use);
   - ``"ragged"``: ``jax.lax.ragged_all_to_all`` into a [capacity, D] receive buffer and back (TPU / GPU; XLA:CPU
     has no ragged-all-to-all);
   - ``"ring"``: ``all_gather`` the tokens over ``expert``, each device runs its experts on the rows routed to them,
     ``psum_scatter`` returns each token's sum to its owner (no receive buffer; the capacity rule still applies,
     so every transport drops the same assignments);
5. the local expert compute is :func:`qlx.models.moe.experts` (blocked on CPU, ragged_dot on TPU / GPU) on the
   received rows with local expert ids (E_l, one past the last local expert, marks an empty row);
6. unsort, weight by the router weights, sum the k outputs, ``psum`` over the ``mlp`` (tensor) axes.

Capacity (:func:`receive_capacity`): each device receives at most ``capacity`` rows per layer. None (dropless)
gives the worst case ``EP * a`` (every source sends all its assignments to one device); a factor f gives
``min(EP * a, ceil(f * a))`` (a rows arrive per device on average).

Drop rule (:func:`kept_counts`, deterministic): receiver s takes its sources in ring order s, s+1, ..., s-1 (mod
EP), its own tokens first; within a source, rows in the source's sorted order (local expert ascending, then
assignment index t * k + j ascending). The first ``capacity`` rows are kept, the rest dropped: a dropped
assignment contributes zero to its token (the residual stream carries the token on). Ring order from the receiver
spreads drops over the sources instead of always dropping the highest ranks.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from qlx.mesh import spec_axes
from qlx.models.moe import experts, resolve_backend, route
from qlx.models.sharding import spec_for

EP_TRANSPORTS = ("auto", "ragged", "ring", "dense", "xla")
EXPERT_AXIS = "expert"


def resolve_transport(transport: str) -> str:
    """``"auto"`` -> ``"dense"`` on CPU, ``"ragged"`` on TPU / GPU; other names pass through after a check.

    ``"xla"`` turns the shard_map off: the expert compute is left to XLA's automatic partitioning (the comparison
    point of ``benchmarks/moe_ep.py``)."""
    if transport not in EP_TRANSPORTS:
        raise ValueError(
            f"model.moe_ep_transport: unknown transport {transport!r}; valid values: {', '.join(EP_TRANSPORTS)}"
        )
    if transport == "auto":
        return "dense" if jax.default_backend() == "cpu" else "ragged"
    return transport


def _take(x, idx):
    return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def permute_rows(x_nd: jax.Array, idx_m: jax.Array, inv_n: jax.Array) -> jax.Array:
    """out[m] = x[idx[m]], zero where idx[m] is outside [0, N). Returns [M, ...].

    idx [M] and inv [N] are inverse partial bijections: inv[idx[m]] = m for every in-range idx[m], and idx[inv[n]]
    = n for every in-range inv[n] (an out-of-range entry means "no partner"). The backward pass is the inverse
    gather dx[n] = dout[inv[n]] (zero where inv[n] is out of range), so no scatter-add is ever emitted.
    """
    return _take(x_nd, idx_m)


def _permute_fwd(x_nd, idx_m, inv_n):
    return _take(x_nd, idx_m), (idx_m, inv_n)


def _permute_bwd(residuals, dout_md):
    idx_m, inv_n = residuals
    return _take(dout_md, inv_n), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


def receive_capacity(num_assignments: int, ep: int, capacity_factor: float | None) -> int:
    """Rows each device can receive: EP * a when dropless (None), else min(EP * a, ceil(factor * a))."""
    worst = ep * num_assignments
    if capacity_factor is None:
        return worst
    return max(1, min(worst, math.ceil(capacity_factor * num_assignments)))


def kept_counts(send_rs: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """The drop rule on per-peer row counts: send [EP src, EP dst] -> (kept [EP, EP], receive offset [EP, EP]).

    Receiver s orders its sources s, s+1, ..., s-1 (mod EP); before[r, s] = rows of the sources ahead of r;
    kept[r, s] = clip(capacity - before[r, s], 0, send[r, s]); offset[r, s] = min(before[r, s], capacity) is where
    source r's kept rows start in s's receive buffer.
    """
    ep = send_rs.shape[0]
    cols = jnp.arange(ep)[None, :]
    ring_src = (cols + jnp.arange(ep)[:, None]) % ep  # [j, s]: the j-th source of receiver s
    ring_sends = send_rs[ring_src, cols]
    ring_before = jnp.cumsum(ring_sends, axis=0) - ring_sends
    before_rs = ring_before[(jnp.arange(ep)[:, None] - cols) % ep, cols]
    kept_rs = jnp.clip(capacity - before_rs, 0, send_rs)
    return kept_rs, jnp.minimum(before_rs, capacity)


def _local_experts(src_r, row_c, counts_re, kept_rs, me, num_local):
    """Local expert id of received row c of source r (num_local where the row is empty): the c-th kept row of r's
    chunk for this device, whose rows are sorted by expert."""
    counts_rl = lax.dynamic_slice_in_dim(counts_re, me * num_local, num_local, axis=1)
    ends = jnp.cumsum(counts_rl, axis=1)[src_r]  # [rows, E_l]
    local = jnp.sum(ends <= row_c[:, None], axis=1).astype(jnp.int32)
    return jnp.where(row_c < kept_rs[src_r, me], local, num_local)


def _dispatch_plan(key_a, send_rs, kept_rs, me, num_experts, num_local):
    """Sort order of the assignments and, per sorted row, its destination, place in that chunk and kept flag."""
    a = key_a.shape[0]
    ep = send_rs.shape[0]
    order = jnp.argsort(key_a, stable=True).astype(jnp.int32)
    inv = jnp.zeros((a,), jnp.int32).at[order].set(jnp.arange(a, dtype=jnp.int32))
    sorted_key = key_a[order]
    dest = jnp.minimum(sorted_key // num_local, ep - 1)
    start_d = jnp.cumsum(send_rs[me]) - send_rs[me]
    place = jnp.arange(a, dtype=jnp.int32) - start_d[dest]
    kept = (sorted_key < num_experts) & (place < kept_rs[me, dest])
    return order, inv, dest, start_d, place, kept


def _check_ep(mesh: Mesh, num_experts: int, gate_up_spec: PartitionSpec, token_axes: tuple[str, ...]):
    ep = mesh.shape[EXPERT_AXIS]
    if gate_up_spec[0] != EXPERT_AXIS:
        raise ValueError(
            f"model.moe_ep_transport: expert parallelism needs the expert weights sharded over exactly the mesh axis "
            f"'expert' (got {gate_up_spec[0]!r}); model.num_experts ({num_experts}) must be divisible by mesh.expert "
            f"({ep}) and the rule 'experts' must be ['expert']"
        )
    mlp_axes = spec_axes(gate_up_spec[3])
    clash = sorted(set(mlp_axes) & set(token_axes))
    if clash:
        raise ValueError(f"mesh.rules: axis {clash[0]!r} shards both the tokens and the expert width ('mlp')")


def _splitting(mesh: Mesh, axes: tuple[str, ...]) -> tuple[str, ...]:
    """The axes of ``axes`` with size > 1: a size-1 axis splits nothing, and naming it in a shard_map would only
    add pcasts over it (all-reduces over singleton replica groups)."""
    return tuple(axis for axis in axes if mesh.shape[axis] > 1)


def ep_route(
    logits_te: jax.Array,
    top_k: int,
    normalize: bool,
    *,
    mesh: Mesh,
    token_axes: tuple[str, ...],
    replay_tk: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`qlx.models.moe.route` run per token shard in a shard_map: logits [N, E] (rows split over
    ``token_axes``; ``replay_tk`` [N, k] as there) -> (weights [N, k], experts [N, k], probs [N, E]).

    Left to XLA's partitioner, top_k all-gathers the [N, E] probabilities and routes every token on every device.
    N is padded internally to a multiple of the token shards (padding rows are routed, then sliced off)."""
    axes = _splitting(mesh, token_axes)
    n = logits_te.shape[0]
    pad = -n % math.prod(mesh.shape[axis] for axis in axes)
    rows = PartitionSpec(axes, None)
    inputs = [logits_te] if replay_tk is None else [logits_te, replay_tk.astype(jnp.int32)]
    routed = jax.shard_map(
        lambda logits, *replay: route(logits, top_k, normalize, *replay),
        mesh=mesh,
        in_specs=(rows,) * len(inputs),
        out_specs=(rows, rows, rows),
    )(*(jnp.pad(a, ((0, pad), (0, 0))) for a in inputs))
    return tuple(out[:n] for out in routed)


def token_axes(mesh: Mesh, rules, shape_btd) -> tuple[str, ...]:
    """Mesh axes splitting the flattened [B * T] tokens: those of "batch", then "length", then ``expert``."""
    spec = spec_for(shape_btd, ("batch", "length", "embed"), mesh, rules)
    axes = spec_axes(spec[0]) + spec_axes(spec[1])
    return axes if EXPERT_AXIS in axes else (*axes, EXPERT_AXIS)


def ep_experts(
    x_td: jax.Array,
    weights_tk: jax.Array,
    experts_tk: jax.Array,
    valid_t: jax.Array,
    w_gate_up_edgi: jax.Array,
    w_down_eid: jax.Array,
    *,
    mesh: Mesh,
    rules,
    token_axes: tuple[str, ...],
    transport: str = "auto",
    capacity_factor: float | None = None,
    backend: str = "auto",
    block_size: int = 128,
) -> tuple[jax.Array, jax.Array]:
    """Expert-parallel MoE: y[t] = sum_j weights[t, j] * SwiGLU_{experts[t, j]}(x[t]) over kept assignments.

    x [N, D] (global; rows split over ``token_axes``); weights [N, k] (float32); experts [N, k] (int); valid [N]
    (False: padding, never sent); w_gate_up [E, D, 2, I]; w_down [E, I, D] (sharded over ``expert``, and ``mlp``
    over the axes the rules give it). N is padded internally to a multiple of the token shards.
    Returns (y [N, D] in x's dtype, drops [2] float32 = (dropped assignments, routed assignments) summed over the
    whole mesh's tokens).
    """
    transport = resolve_transport(transport)
    backend = resolve_backend(backend)
    num_experts = w_gate_up_edgi.shape[0]
    ep = mesh.shape[EXPERT_AXIS]
    gate_up_spec = spec_for(w_gate_up_edgi.shape, ("experts", None, None, "mlp"), mesh, rules)
    _check_ep(mesh, num_experts, gate_up_spec, token_axes)
    token_axes = _splitting(mesh, token_axes)
    mlp_axes = _splitting(mesh, spec_axes(gate_up_spec[3]))
    num_local = num_experts // ep
    n_global, k = experts_tk.shape
    shards = math.prod(mesh.shape[axis] for axis in token_axes)
    pad = -n_global % shards
    if pad:
        x_td = jnp.pad(x_td, ((0, pad), (0, 0)))
        weights_tk = jnp.pad(weights_tk, ((0, pad), (0, 0)))
        experts_tk = jnp.pad(experts_tk, ((0, pad), (0, 0)))
        valid_t = jnp.pad(valid_t, (0, pad))
    n = (n_global + pad) // shards
    a = n * k
    capacity = receive_capacity(a, ep, capacity_factor)

    weight_only = tuple(axis for axis in (EXPERT_AXIS, *mlp_axes) if axis not in token_axes)
    token_only = tuple(axis for axis in token_axes if axis not in (EXPERT_AXIS, *mlp_axes))

    def local(x_nd, w_nk, e_nk, valid_n, gu_ldgi, dn_lid):
        # every value varies over the same manual axes, so the custom VJPs see cotangents typed like their inputs
        x_nd, w_nk = lax.pcast((x_nd, w_nk), weight_only, to="varying")
        gu_ldgi, dn_lid = lax.pcast((gu_ldgi, dn_lid), token_only, to="varying")
        me = lax.axis_index(EXPERT_AXIS)
        dt = x_nd.dtype
        key_a = jnp.where(valid_n[:, None], e_nk, num_experts).reshape(a).astype(jnp.int32)
        counts_e = jnp.zeros((num_experts,), jnp.int32).at[key_a].add(1, mode="drop")
        counts_re = lax.all_gather(counts_e, EXPERT_AXIS)
        send_rs = counts_re.reshape(ep, ep, num_local).sum(-1)
        kept_rs, offset_rs = kept_counts(send_rs, capacity)
        drops = jnp.stack([jnp.sum(send_rs[me] - kept_rs[me]), jnp.sum(send_rs[me])]).astype(jnp.float32)
        drops = lax.psum(drops, token_axes)
        order, inv, dest, start_d, place, kept = _dispatch_plan(key_a, send_rs, kept_rs, me, num_experts, num_local)

        def compute(rows_md, local_m):
            ones = jnp.ones_like(rows_md[:, :1])
            return experts(rows_md, ones, local_m[:, None], gu_ldgi, dn_lid, backend=backend, block_size=block_size)

        if transport == "ring":
            keep_nk = _take(kept, inv).reshape(n, k)
            e_kept = jnp.where(keep_nk, e_nk, num_experts)
            x_all = lax.all_gather(x_nd, EXPERT_AXIS, tiled=True)
            e_all = lax.all_gather(e_kept, EXPERT_AXIS, tiled=True) - me * num_local
            w_all = lax.all_gather(w_nk, EXPERT_AXIS, tiled=True)
            e_all = jnp.where((e_all >= 0) & (e_all < num_local), e_all, num_local)
            y_all = experts(x_all, w_all, e_all, gu_ldgi, dn_lid, backend=backend, block_size=block_size)
            y_nd = lax.psum_scatter(y_all, EXPERT_AXIS, scatter_dimension=0, tiled=True)
        else:
            x_sorted = permute_rows(jnp.repeat(x_nd, k, axis=0), order, inv)
            if transport == "dense":
                slots = min(capacity, a)
                q_dest, q_place = jnp.divmod(jnp.arange(ep * slots, dtype=jnp.int32), slots)
                pack = jnp.where(q_place < kept_rs[me, q_dest], start_d[q_dest] + q_place, a)
                unpack = jnp.where(kept, dest * slots + place, ep * slots)
                send = permute_rows(x_sorted, pack, unpack).reshape(ep, slots, -1)
                recv_md = lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True).reshape(ep * slots, -1)
                local_m = _local_experts(q_dest, q_place, counts_re, kept_rs, me, num_local)
                y_md = compute(recv_md, local_m)
                back = lax.all_to_all(y_md.reshape(ep, slots, -1), EXPERT_AXIS, 0, 0, tiled=True)
                y_sorted = permute_rows(back.reshape(ep * slots, -1), unpack, pack)
            else:
                ring_src = (me + jnp.arange(ep)) % ep
                ends = jnp.cumsum(kept_rs[ring_src, me])
                row = jnp.arange(capacity, dtype=jnp.int32)
                pos = jnp.minimum(jnp.sum(ends[None, :] <= row[:, None], axis=1), ep - 1)
                src_m = ring_src[pos]
                local_m = _local_experts(src_m, row - offset_rs[src_m, me], counts_re, kept_rs, me, num_local)
                recv_md = lax.ragged_all_to_all(
                    x_sorted,
                    jnp.zeros_like(x_sorted, shape=(capacity, x_nd.shape[1])),
                    start_d,
                    kept_rs[me],
                    offset_rs[me],
                    kept_rs[:, me],
                    axis_name=EXPERT_AXIS,
                )
                y_md = compute(recv_md, local_m)
                start_rs = jnp.cumsum(send_rs, axis=1) - send_rs
                y_sorted = lax.ragged_all_to_all(
                    y_md,
                    jnp.zeros_like(y_md, shape=(a, x_nd.shape[1])),
                    offset_rs[:, me],
                    kept_rs[:, me],
                    start_rs[:, me],
                    kept_rs[me],
                    axis_name=EXPERT_AXIS,
                )
            y_nkd = permute_rows(y_sorted, inv, order).reshape(n, k, -1)
            y_nd = jnp.einsum("nkd,nk->nd", y_nkd, w_nk.astype(dt))
        if mlp_axes:
            y_nd = lax.psum(y_nd, mlp_axes)
        return y_nd, drops

    tokens = PartitionSpec(token_axes)
    rows = PartitionSpec(token_axes, None)
    mlp = mlp_axes or None
    down_spec = PartitionSpec(EXPERT_AXIS, mlp, None)
    y_td, drops = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rows, rows, rows, tokens, PartitionSpec(EXPERT_AXIS, None, None, mlp), down_spec),
        out_specs=(rows, PartitionSpec()),
    )(x_td, weights_tk.astype(jnp.float32), experts_tk.astype(jnp.int32), valid_t, w_gate_up_edgi, w_down_eid)
    return y_td[:n_global], drops


def token_sharded_experts(
    logits_te: jax.Array,
    x_td: jax.Array,
    valid_t: jax.Array,
    w_gate_up_edgi: jax.Array,
    w_down_eid: jax.Array,
    *,
    top_k: int,
    normalize: bool,
    mesh: Mesh,
    rules,
    token_axes: tuple[str, ...],
    backend: str = "auto",
    block_size: int = 128,
    replay_tk: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The MoE layer without expert parallelism (mesh ``expert`` = 1) on a mesh: routing and
    :func:`qlx.models.moe.experts` run per token shard in a shard_map, with every expert's weights gathered (FSDP).

    Left to XLA's partitioner, the sort by expert and its gathers have data-dependent indices, so every device
    gathers all N·k assignments of the whole batch ([N·k, D], all-reduced) and runs every expert on them: on v5p
    (stage 1, fsdp 16 x seq 4, 16 rows x 32,768 tokens) 16 GiB per buffer, 46 GiB of temporaries for one layer.
    Here each device sorts and computes only its n = N / shards tokens: [n·k, D].

    logits [N, E] (float32 router logits), x [N, D], valid [N] (False: padding, routed to no expert); rows split
    over ``token_axes``; w_gate_up [E, D, 2, I], w_down [E, I, D] (``mlp`` split over the axes the rules give it,
    which must not split tokens); replay_tk [N, k]: routing replay (:func:`qlx.models.moe.route`). N is padded
    internally to a multiple of the token shards.
    Returns (y [N, D] in x's dtype, experts [N, k] int32 (E where valid is False), probs [N, E] float32).
    """
    backend = resolve_backend(backend)
    num_experts = w_gate_up_edgi.shape[0]
    gate_up_spec = spec_for(w_gate_up_edgi.shape, ("experts", None, None, "mlp"), mesh, rules)
    token_axes = _splitting(mesh, token_axes)
    mlp_axes = _splitting(mesh, spec_axes(gate_up_spec[3]))
    clash = sorted(set(mlp_axes) & set(token_axes))
    if clash:
        raise ValueError(f"mesh.rules: axis {clash[0]!r} shards both the tokens and the expert width ('mlp')")
    n_global = x_td.shape[0]
    pad = -n_global % math.prod(mesh.shape[axis] for axis in token_axes)
    replay = () if replay_tk is None else (replay_tk.astype(jnp.int32),)
    logits_te, x_td, valid_t, *replay = (
        jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) for a in (logits_te, x_td, valid_t, *replay)
    )

    def local(logits_ne, x_nd, valid_n, gu_edgi, dn_eid, *replay_nk):
        w_nk, e_nk, probs_ne = route(logits_ne, top_k, normalize, *replay_nk)
        e_nk = jnp.where(valid_n[:, None], e_nk, num_experts)
        # every value varies over the same manual axes, so the custom VJPs see cotangents typed like their inputs
        x_nd, w_nk = lax.pcast((x_nd, w_nk), mlp_axes, to="varying")
        gu_edgi, dn_eid = lax.pcast((gu_edgi, dn_eid), token_axes, to="varying")
        y_nd = experts(x_nd, w_nk, e_nk, gu_edgi, dn_eid, backend=backend, block_size=block_size)
        return (lax.psum(y_nd, mlp_axes) if mlp_axes else y_nd), e_nk, probs_ne

    rows = PartitionSpec(token_axes, None)
    mlp = mlp_axes or None
    y_td, experts_tk, probs_te = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(
            rows,
            rows,
            PartitionSpec(token_axes),
            PartitionSpec(None, None, None, mlp),
            PartitionSpec(None, mlp),
            *(rows for _ in replay),
        ),
        out_specs=(rows, rows, rows),
    )(logits_te, x_td, valid_t, w_gate_up_edgi, w_down_eid, *replay)
    return y_td[:n_global], experts_tk[:n_global], probs_te[:n_global]
