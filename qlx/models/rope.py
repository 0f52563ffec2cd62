"""Rotary position embeddings (RoPE) with optional YaRN scaling, numerically as Hugging Face computes them.

``rope_frequencies`` mirrors transformers' ``_compute_default_rope_parameters`` and ``_compute_yarn_parameters``
(float32 arithmetic, ``truncate=True`` correction range); ``apply_rope`` is ``q * cos + rotate_half(q) * sin`` with
the half-split (not interleaved) layout, and cos/sin already multiplied by YaRN's attention factor.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qlx.config import RopeScalingConfig


def yarn_attention_factor(scaling: RopeScalingConfig) -> float:
    """YaRN's attention temperature: ``attention_factor`` if set, else 0.1 * ln(factor) + 1 (1 when factor <= 1)."""
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    return 1.0 if scaling.factor <= 1 else 0.1 * math.log(scaling.factor) + 1.0


@functools.lru_cache(maxsize=32)
def rope_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig | None) -> tuple[np.ndarray, float]:
    """Inverse frequencies inv_freq [head_dim // 2] (float32) and the cos/sin scale (YaRN attention factor, else 1).

    Plain RoPE: inv_freq_i = 1 / theta^(2i / head_dim).
    YaRN: blend of extrapolated (1 / theta^(2i/d)) and interpolated (1 / (factor * theta^(2i/d))) frequencies with
    a linear ramp between the correction dims of beta_fast and beta_slow rotations over the original window.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    pos_freqs = np.power(np.float32(theta), exponents, dtype=np.float32)
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if scaling is None:
        return inv_freq, 1.0

    def correction_dim(num_rotations: float) -> float:
        window = scaling.original_max_position_embeddings
        return (head_dim * math.log(window / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_weight = (np.float32(1.0) - ramp.astype(np.float32)).astype(np.float32)
    interpolated = (np.float32(1.0) / (np.float32(scaling.factor) * pos_freqs)).astype(np.float32)
    blended = interpolated * (np.float32(1.0) - extrapolation_weight) + inv_freq * extrapolation_weight
    return blended.astype(np.float32), yarn_attention_factor(scaling)


def rope_cos_sin(positions_bt: jax.Array, inv_freq: np.ndarray, scale: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, head_dim] (float32) for integer positions [B, T]: angle = position * inv_freq, repeated twice."""
    angles_btf = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles_btk = jnp.concatenate([angles_btf, angles_btf], axis=-1)
    return jnp.cos(angles_btk) * scale, jnp.sin(angles_btk) * scale


def apply_rope(x_bthk: jax.Array, cos_btk: jax.Array, sin_btk: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1]; x [B, T, H, K], cos/sin [B, T, K]."""
    half = x_bthk.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthk[..., half:], x_bthk[..., :half]], axis=-1)
    cos = cos_btk[:, :, None, :].astype(x_bthk.dtype)
    sin = sin_btk[:, :, None, :].astype(x_bthk.dtype)
    return x_bthk * cos + rotated * sin
