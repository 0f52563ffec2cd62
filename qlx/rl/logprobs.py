"""Per-token log-probabilities and full-vocabulary entropy without a [tokens, vocab] array.

For hidden states h [N, D], an output projection W [D, V], targets y [N] and temperature τ:

    z_t   = (h_t @ W) / τ                          (float32, temperature-scaled logits)
    lse_t = log Σ_v exp z_{t,v}
    logp_t = z_{t, y_t} − lse_t
    H_t   = − Σ_v p_{t,v} log p_{t,v} = lse_t − Σ_v p_{t,v} z_{t,v},   p = softmax(z)

The forward pass walks tiles of [chunk, vocab_chunk] logits with an online log-sum-exp; the backward pass (a custom
VJP) recomputes each tile from the saved per-token lse and entropy:

    ∂logp_t/∂z_{t,v} = 1[v = y_t] − p_{t,v}
    ∂H_t/∂z_{t,v}    = − p_{t,v} (log p_{t,v} + H_t)

looping over vocabulary blocks outside and token blocks inside, so each block of ∂W is accumulated once in float32
and written once. Live memory beyond the inputs and gradients is a few float32 tiles plus a float32 [N, D] buffer
for ∂h; no copy of W is made (16-bit W on the CPU backend included: see ``_slice``; there ∂W passes through a
uint16 staging buffer of 1/8 of its size: see ``_to_bits``). Ragged ends are handled by letting the last block
overlap its predecessor, so nothing is padded: overlapping tokens and vocabulary columns are masked out of the
sums, and the last ∂W block rewrites its overlap with the values already there (∂W is only written, never read
back, which keeps the CPU backend from converting it to float32).
"""

import functools
import math

import jax
import jax.numpy as jnp


def token_logprobs_and_entropy(hidden, lm_head, targets, mask=None, *, temperature=1.0, chunk=1024, vocab_chunk=4096):
    """Log-probability of each target token and the entropy of its full next-token distribution.

    Args:
      hidden: [..., D] final hidden states (after the final norm), any float dtype; leading dims are flattened, so
        [N, D] and [B, T, D] both work.
      lm_head: [D, V] output projection (for tied embeddings pass ``embedding.T``).
      targets: [...] int token ids, same leading shape as ``hidden``.
      mask: optional [...] bool/0-1 array; masked positions return 0 for both outputs and get no gradient.
        Inside a shard_map, ``hidden`` and ``lm_head`` must vary over the same manual axes.
      temperature: τ > 0; the distribution is softmax(h @ W / τ), as the sampler used it.
      chunk: tokens per tile. vocab_chunk: vocabulary columns per tile. A tile's logits are
        chunk × vocab_chunk float32 values (16 MiB at the defaults).

    Returns:
      (logp [...], entropy [...]) float32, differentiable in ``hidden`` and ``lm_head``.
    """
    *lead, d = hidden.shape
    if lm_head.ndim != 2 or lm_head.shape[0] != d:
        raise ValueError(f"lm_head must be [D={d}, V], got shape {lm_head.shape}")
    if tuple(targets.shape) != tuple(lead):
        raise ValueError(f"targets shape {targets.shape} must equal hidden's leading shape {tuple(lead)}")
    if mask is not None and tuple(mask.shape) != tuple(lead):
        raise ValueError(f"mask shape {mask.shape} must equal hidden's leading shape {tuple(lead)}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"chunk and vocab_chunk must be >= 1, got {chunk} and {vocab_chunk}")
    n = math.prod(lead)
    if n == 0:
        empty = jnp.zeros(tuple(lead), jnp.float32)
        return empty, empty
    tiles = (min(int(chunk), n), min(int(vocab_chunk), lm_head.shape[1]), temperature)
    logp_n, ent_n = _logp_entropy(hidden.reshape(n, d), lm_head, targets.reshape(n).astype(jnp.int32), tiles)
    logp, ent = logp_n.reshape(lead), ent_n.reshape(lead)
    if mask is not None:
        keep = mask.astype(bool)
        logp, ent = jnp.where(keep, logp, 0.0), jnp.where(keep, ent, 0.0)
    return logp, ent


def _block(i, size, total):
    """Start of block i (the last block is shifted back to end at ``total``) and which of its entries are new."""
    start = jnp.minimum(i * size, total - size)
    fresh = start + jnp.arange(size) >= i * size
    return start, fresh


def _zeros_like(x, shape, dtype):
    """Zeros of ``shape`` typed like ``x`` for a loop carry: inside a shard_map they vary over the manual axes ``x``
    varies over (a loop's carry must keep its type), elsewhere plain zeros."""
    return jax.lax.full_like(x, 0, dtype, shape)


def _cpu_16bit(dtype) -> bool:
    return jnp.dtype(dtype).itemsize == 2 and jax.default_backend() == "cpu"


def _slice(x, start, size, axis):
    """``size`` entries of ``x`` from ``start`` along ``axis``, inside a loop.

    On CPU, a bf16 array that a loop slices dynamically becomes a float32 copy of the whole array, hoisted out of
    the loop (for lm_head 1.2 GiB); viewed as uint16 it becomes a uint16 copy (0.6 GiB). Here the view is taken
    inside the loop on an optimization barrier tied to the loop's ``start``, so it cannot be hoisted: it fuses with
    the slice, which reads only the block, and no copy of ``x`` exists."""
    if not _cpu_16bit(x.dtype):
        return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)
    x, start = jax.lax.optimization_barrier((x, start))
    block = jax.lax.dynamic_slice_in_dim(jax.lax.bitcast_convert_type(x, jnp.uint16), start, size, axis=axis)
    return jax.lax.bitcast_convert_type(block, x.dtype)


_CPU_FLUSHES = 8


def _to_bits(x):
    """On CPU, 16-bit floats as uint16. There, a loop's dynamic update of a bf16 array converts the whole array to
    float32 and back at every step (slow), while a uint16 array is updated in place but must be copied once to
    become bf16. So ∂W blocks gather in a uint16 buffer of 1/_CPU_FLUSHES of ∂W (copied once each) and enter the
    bf16 ∂W in _CPU_FLUSHES whole-array steps. Else unchanged."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if _cpu_16bit(x.dtype) else x


def _tile_logits(h_cd, w_dv, temperature):
    return jnp.dot(h_cd, w_dv, preferred_element_type=jnp.float32) / temperature


def _forward(h_nd, w_dv, y_n, tiles):
    c, vc, temperature = tiles
    n, v = h_nd.shape[0], w_dv.shape[1]
    n_tok, n_voc = -(-n // c), -(-v // vc)

    def token_block(i):
        t0, _ = _block(i, c, n)
        h_cd = _slice(h_nd, t0, c, 0)
        y_c = jax.lax.dynamic_slice_in_dim(y_n, t0, c)

        def vocab_block(carry, j):
            m_c, s_c, u_c, tgt_c = carry
            v0, fresh_v = _block(j, vc, v)
            z_cv = _tile_logits(h_cd, _slice(w_dv, v0, vc, 1), temperature)
            z_cv = jnp.where(fresh_v[None, :], z_cv, -jnp.inf)
            m_new = jnp.maximum(m_c, z_cv.max(axis=1))
            e_cv = jnp.exp(z_cv - m_new[:, None])
            scale = jnp.exp(m_c - m_new)
            s_c = s_c * scale + e_cv.sum(axis=1)
            u_c = u_c * scale + jnp.sum(e_cv * jnp.where(fresh_v[None, :], z_cv, 0.0), axis=1)
            hit_cv = ((v0 + jnp.arange(vc))[None, :] == y_c[:, None]) & fresh_v[None, :]
            tgt_c = tgt_c + jnp.sum(jnp.where(hit_cv, z_cv, 0.0), axis=1)
            return (m_new, s_c, u_c, tgt_c), None

        zero_c = _zeros_like(h_cd, (c,), jnp.float32)
        init = (zero_c - jnp.inf, zero_c, zero_c, zero_c)
        (m_c, s_c, u_c, tgt_c), _ = jax.lax.scan(vocab_block, init, jnp.arange(n_voc))
        lse_c = m_c + jnp.log(s_c)
        return tgt_c - lse_c, lse_c - u_c / s_c, lse_c

    logp, ent, lse = jax.lax.map(token_block, jnp.arange(n_tok))
    skip = (n_tok - 1) * c - (n - c)

    def unblock(x):
        return jnp.concatenate([x[:-1].reshape(-1), x[-1, skip:]])

    return unblock(logp), unblock(ent), unblock(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _logp_entropy(h_nd, w_dv, y_n, tiles):
    logp, ent, _ = _forward(h_nd, w_dv, y_n, tiles)
    return logp, ent


def _logp_entropy_fwd(h_nd, w_dv, y_n, tiles):
    logp, ent, lse = _forward(h_nd, w_dv, y_n, tiles)
    return (logp, ent), (h_nd, w_dv, y_n, lse, ent)


def _logp_entropy_bwd(tiles, residuals, cotangents):
    c, vc, temperature = tiles
    h_nd, w_dv, y_n, lse_n, ent_n = residuals
    g_logp_n, g_ent_n = cotangents
    n, d = h_nd.shape
    v = w_dv.shape[1]
    n_tok, n_voc = -(-n // c), -(-v // vc)
    # ∂W is written group by group: on CPU with 16-bit W, each group of vocabulary blocks fills a uint16 staging
    # buffer (see _to_bits) that is then written into ∂W in one step; elsewhere one group holds every block.
    blocks = -(-n_voc // _CPU_FLUSHES) if _cpu_16bit(w_dv.dtype) else n_voc
    group = min(v, blocks * vc)
    n_group = -(-v // group)

    def group_grads(dh_nd, f):
        """∂h updated with, and the (staged) ∂W columns [D, group] of, vocabulary group f."""
        g0, fresh_g = _block(f, group, v)

        def vocab_block(carry, j):
            dh_nd, dw_dg = carry
            b0, fresh_b = _block(j, vc, group)
            v0 = g0 + b0
            fresh_v = fresh_b & jax.lax.dynamic_slice_in_dim(fresh_g, b0, vc)
            w_dc = _slice(w_dv, v0, vc, 1)
            # ∂h must not count columns a block shares with an earlier one; ∂W rewrites them with equal values
            w_fresh_dc = jnp.where(fresh_v[None, :], w_dc.astype(jnp.float32), 0.0)

            def token_block(inner, i):
                dh_nd, dw_dc = inner
                t0, fresh_t = _block(i, c, n)

                def rows(x):
                    return jax.lax.dynamic_slice_in_dim(x, t0, c)

                h_cd = _slice(h_nd, t0, c, 0)
                y_c, lse_c, ent_c, g_logp_c, g_ent_c = map(rows, (y_n, lse_n, ent_n, g_logp_n, g_ent_n))
                logq_cv = _tile_logits(h_cd, w_dc, temperature) - lse_c[:, None]
                p_cv = jnp.exp(logq_cv)
                hit_cv = (v0 + jnp.arange(vc))[None, :] == y_c[:, None]
                dz_cv = g_logp_c[:, None] * (hit_cv - p_cv) - g_ent_c[:, None] * p_cv * (logq_cv + ent_c[:, None])
                dz_cv = jnp.where(fresh_t[:, None], dz_cv, 0.0) / temperature
                dh_cd = rows(dh_nd) + jnp.dot(dz_cv, w_fresh_dc.T, preferred_element_type=jnp.float32)
                dw_dc = dw_dc + jnp.dot(h_cd.astype(jnp.float32).T, dz_cv, preferred_element_type=jnp.float32)
                return (jax.lax.dynamic_update_slice_in_dim(dh_nd, dh_cd, t0, axis=0), dw_dc), None

            init = (dh_nd, _zeros_like(w_dv, (d, vc), jnp.float32))
            (dh_nd, dw_dc), _ = jax.lax.scan(token_block, init, jnp.arange(n_tok))
            dw_dc = _to_bits(dw_dc.astype(w_dv.dtype))
            return (dh_nd, jax.lax.dynamic_update_slice_in_dim(dw_dg, dw_dc, b0, axis=1)), None

        init = (dh_nd, _to_bits(_zeros_like(w_dv, (d, group), w_dv.dtype)))
        (dh_nd, dw_dg), _ = jax.lax.scan(vocab_block, init, jnp.arange(-(-group // vc)))
        return dh_nd, jax.lax.bitcast_convert_type(dw_dg, w_dv.dtype)

    dh_nd = _zeros_like(h_nd, (n, d), jnp.float32)
    if n_group == 1:
        dh_nd, dw_dv = group_grads(dh_nd, 0)
    else:

        def flush(carry, f):
            dh_nd, dw_dv = carry
            dh_nd, dw_dg = group_grads(dh_nd, f)
            return (dh_nd, jax.lax.dynamic_update_slice_in_dim(dw_dv, dw_dg, _block(f, group, v)[0], axis=1)), None

        init = (dh_nd, _zeros_like(w_dv, (d, v), w_dv.dtype))
        (dh_nd, dw_dv), _ = jax.lax.scan(flush, init, jnp.arange(n_group))
    return dh_nd.astype(h_nd.dtype), dw_dv, None


_logp_entropy.defvjp(_logp_entropy_fwd, _logp_entropy_bwd)


def naive_logprobs_and_entropy(hidden, lm_head, targets, mask=None, *, temperature=1.0):
    """Reference: the same quantities through one full [..., V] float32 logits array (for tests and benchmarks)."""
    z = jnp.dot(hidden, lm_head, preferred_element_type=jnp.float32) / temperature
    logq = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(logq, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logq) * logq, axis=-1)
    if mask is not None:
        keep = mask.astype(bool)
        logp, ent = jnp.where(keep, logp, 0.0), jnp.where(keep, ent, 0.0)
    return logp, ent
