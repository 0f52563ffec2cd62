"""Plain dense attention: the reference every kernel module is checked against (O(T x S) memory; small sizes only)."""

from __future__ import annotations

import jax.numpy as jnp

from .common import MASK_VALUE


def mha_reference(q, k, v, q_seg=None, kv_seg=None, *, causal: bool, sm_scale: float):
    """Dense grouped-query attention.

    q [B, T, Hq, D], k, v [B, S, Hkv, D], q_seg [B, T], kv_seg [B, S] (or None).
      s[b, h, t, u] = sm_scale * q[b, t, h] . k[b, u, h // G]           (G = Hq // Hkv)
      visible(t, u) = (not causal or u <= t) and q_seg[b, t] == kv_seg[b, u]
      lse[b, t, h] = log sum_{visible u} exp(s);  o[b, t, h] = sum_u exp(s - lse) v[b, u, h // G]
    Returns (o [B, T, Hq, D] in q.dtype, lse [B, T, Hq] float32); rows with nothing visible get o = 0, lse = -inf.
    """
    b, t, hq, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    q5 = q.reshape(b, t, hkv, hq // hkv, d)
    s = jnp.einsum("btkgd,bukd->bkgtu", q5, k, preferred_element_type=jnp.float32) * sm_scale
    visible = jnp.ones((t, s_len), bool)
    if causal:
        visible = jnp.tril(visible)
    visible = jnp.broadcast_to(visible, (b, 1, 1, t, s_len))
    if q_seg is not None:
        visible = visible & (q_seg[:, None, None, :, None] == kv_seg[:, None, None, None, :])
    s = jnp.where(visible, s, MASK_VALUE)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    dead = ~jnp.any(visible, axis=-1, keepdims=True)
    lse = jnp.where(dead, -jnp.inf, m + jnp.log(jnp.where(dead, 1.0, l)))
    o = jnp.einsum("bkgtu,bukd->btkgd", jnp.where(dead, 0.0, p / jnp.where(dead, 1.0, l)), v.astype(jnp.float32))
    return o.reshape(b, t, hq, d).astype(q.dtype), lse[..., 0].transpose(0, 3, 1, 2).reshape(b, t, hq)
