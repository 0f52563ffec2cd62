"""Per-tensor merge methods with mergekit 0.1.x semantics, as pure functions computed block by block.

Notation (one tensor, flattened to n elements): base ``B``, models ``X_1..X_M``, task vectors ``δ_m = X_m − B``.
Elementwise arithmetic is float32 (inputs of any float dtype, bfloat16 included, are upcast exactly); reductions
over the tensor (sums of squares, L1 norms) accumulate in float64; the result is cast once to the output dtype.

- ``linear``: ``Σ w_m X_m / Σ w_m`` (``normalize``, default true; false: ``Σ w_m X_m``). The base's values are not
  used (mergekit's linear has no base); pass the base among ``models`` with a weight to include it.
- ``task_arithmetic``: ``B + λ · Σ w_m δ_m`` (``normalize`` default false; true divides by ``Σ w_m``, a sum with
  ``|Σ w| < 1e-8`` counting as 1).
- ``ties``: per model keep the ``k = floor(d_m · n)`` largest ``|δ_m|`` (density ``d_m`` < 1; ``k = 0`` keeps
  nothing), optionally L1-rescaled (``rescale``, default false); ``u_m = w_m δ̃_m``; majority sign
  ``s = +1 where Σ u_m ≥ 0 else −1``; ``E_m = [sign(u_m) == s]`` (a zero never agrees); ``mixed = Σ E_m u_m``,
  divided by ``Σ w_m E_m`` (0 counts as 1) when ``normalize`` (default true); result ``B + λ · mixed``.
- ``dare_ties``: ``ties`` with a Bernoulli(``d_m``) keep mask instead of the top-k, ``rescale`` default true,
  ``normalize`` default false.
- ``dare_linear``: the DARE mask, no sign consensus: ``B + λ · Σ w_m δ̃_m`` (/ ``Σ w_m`` when ``normalize``, default
  false).
- ``sce`` (no weights; ``select_topk`` τ, ``variant``): select, calculate, erase, merge.
  mergekit 0.1.x (default): if τ < 1, zero ``δ`` outside the top ``k = floor(τ · nnz(v))`` positions of the
  elementwise population variance ``v = Var_m(δ)`` (per tensor; τ = 0 or k = 0 keeps nothing; zero-variance
  positions are never kept); ``η_m = w_m / Σ w`` with ``w_m = mean(δ_m²)`` (uniform ``1/M`` when ``|Σ w| < 1e-6``,
  which RL-sized deltas hit); ``s = +1 where Σ δ_m ≥ 0 else −1``; ``E_m = [sign(δ_m) == s]``; result
  ``B + Σ η_m E_m δ_m / max(Σ η_m E_m, 1e-6)``. FuseChat: the mask only shapes ``w`` (erase and merge use the
  unmasked ``δ``), uniform only when ``Σ w == 0``, and a divisor of 0 counts as 1. One model at τ = 1 returns the
  model; identical models at τ < 1 give the base in mergekit and keep the shared delta in FuseChat.

``rescale`` (DARE, TIES) is mergekit's L1-norm match: ``δ̃ = (δ ⊙ keep) · ‖δ‖₁ / ‖δ ⊙ keep‖₁``, skipped when either
norm is below 1e-7 (it is not the DARE paper's ``1/p``).

Top-k selections are exact: the k-th largest value by ``np.partition`` (introselect), every larger value kept, and
ties at the k-th value broken by flat index (lower first); never a quantile threshold. Because the kept set depends
only on values and flat indices, a tensor merged in blocks equals the same tensor merged whole, bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "sce")
VARIANTS = ("mergekit", "fusechat")
DEFAULT_BLOCK_SIZE = 1 << 22
SCE_WEIGHT_EPS = 1e-6  # mergekit 0.1.x: uniform weights when |Σ w| < 1e-6, and the divisor clamp
RESCALE_EPS = 1e-7
NORMALIZE_EPS = 1e-8

_SPARSIFY = {"task_arithmetic": None, "ties": "magnitude", "dare_ties": "random", "dare_linear": "random"}
_DEFAULT_NORMALIZE = {"linear": True, "task_arithmetic": False, "ties": True, "dare_ties": False, "dare_linear": False}
_DEFAULT_RESCALE = {"ties": False, "dare_ties": True, "dare_linear": True}
_KEYS = {
    "linear": {"weights", "normalize"},
    "task_arithmetic": {"weights", "normalize", "lam"},
    "ties": {"weights", "densities", "normalize", "lam", "rescale"},
    "dare_ties": {"weights", "densities", "normalize", "lam", "rescale", "seed"},
    "dare_linear": {"weights", "densities", "normalize", "lam", "rescale", "seed"},
    "sce": {"select_topk", "variant"},
}

Source = Callable[[int, int], np.ndarray]
"""A tensor's flat elements ``[start, stop)`` as a float32 array (never written to by the merge)."""


class MergeError(ValueError):
    """Merge parameters or inputs are invalid; the message names the key, model or tensor."""


@dataclasses.dataclass(frozen=True)
class MergeParams:
    """Resolved parameters of one merge (every default filled in, one value per model).

    method: one of ``METHODS``.
    weights: per-model weight ``w_m`` (linear, task arithmetic, TIES, DARE; mergekit requires it, qlx defaults to 1).
    densities: per-model density ``d_m`` in [0, 1] (TIES: fraction kept by magnitude; DARE: keep probability;
        1 = no sparsification, the default).
    normalize: divide the mixed delta by the (sign-agreeing) weight sum; default per method as in mergekit.
    lam: λ, the factor on the mixed delta (default 1).
    rescale: L1-norm rescale after sparsification (default true for DARE, false for TIES).
    select_topk: SCE τ in [0, 1], the fraction of nonzero-variance positions kept (default 1: no selection).
    seed: DARE mask seed; a tensor's mask depends on (seed, tensor key, model index, flat index) only.
    variant: SCE semantics, ``"mergekit"`` (0.1.x, the default) or ``"fusechat"`` (FuseAI's sce_merging.py).
    """

    method: str
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    normalize: bool
    lam: float = 1.0
    rescale: bool = False
    select_topk: float = 1.0
    seed: int = 0
    variant: str = "mergekit"

    def __post_init__(self):
        if self.method not in METHODS:
            raise MergeError(f"method {self.method!r} is not supported; choose one of {', '.join(METHODS)}")
        if self.variant not in VARIANTS:
            raise MergeError(f"variant {self.variant!r} is not supported; choose one of {', '.join(VARIANTS)}")
        if len(self.weights) != len(self.densities):
            raise MergeError(f"{len(self.weights)} weights but {len(self.densities)} densities")
        for m, d in enumerate(self.densities):
            if not 0.0 <= d <= 1.0:
                raise MergeError(f"densities[{m}] = {d}: a density must lie in [0, 1]")
        if not 0.0 <= self.select_topk <= 1.0:
            raise MergeError(f"select_topk = {self.select_topk}: must lie in [0, 1]")
        if not all(math.isfinite(w) for w in (*self.weights, self.lam)):
            raise MergeError("weights and lam must be finite")


def merge_params(method: str, num_models: int, **params) -> MergeParams:
    """:class:`MergeParams` for ``num_models`` models from mergekit-style keyword parameters.

    ``weights`` / ``densities`` may be one number (every model) or one per model. A key the method does not use is
    refused (``ties`` takes no ``select_topk``), so a typo cannot silently fall back to a default.
    """
    if method not in METHODS:
        raise MergeError(f"method {method!r} is not supported; choose one of {', '.join(METHODS)}")
    unknown = sorted(set(params) - _KEYS[method])
    if unknown:
        raise MergeError(f"{method} takes no parameter {unknown[0]!r}; it takes {', '.join(sorted(_KEYS[method]))}")

    def per_model(key: str, default: float) -> tuple[float, ...]:
        value = params.get(key)
        if value is None:
            return (default,) * num_models
        if np.isscalar(value):
            return (float(value),) * num_models
        values = tuple(float(v) for v in value)
        if len(values) != num_models:
            raise MergeError(f"{key}: {len(values)} values for {num_models} models")
        return values

    normalize = params.get("normalize")
    rescale = params.get("rescale")
    return MergeParams(
        method=method,
        weights=per_model("weights", 1.0),
        densities=per_model("densities", 1.0),
        normalize=_DEFAULT_NORMALIZE.get(method, False) if normalize is None else bool(normalize),
        lam=float(params.get("lam", 1.0)),
        rescale=_DEFAULT_RESCALE.get(method, False) if rescale is None else bool(rescale),
        select_topk=float(params.get("select_topk", 1.0)),
        seed=int(params.get("seed", 0)),
        variant=str(params.get("variant", "mergekit")),
    )


# --------------------------------------------------------------------------------------------------------------------
# exact top-k and the DARE mask


@dataclasses.dataclass(frozen=True)
class Selection:
    """The top-k positions of a statistic ``v`` over a flat tensor: ``v > threshold``, plus ``v == threshold`` at flat
    indices ``<= last_tie`` (ties kept lower index first). ``Selection.empty()`` keeps nothing."""

    threshold: float
    last_tie: int

    @staticmethod
    def empty() -> Selection:
        return Selection(math.inf, -1)

    def mask(self, v: np.ndarray, start: int) -> np.ndarray:
        """Boolean keep mask of the block ``v`` = the statistic at flat indices ``[start, start + len(v))``."""
        t = np.float32(self.threshold)
        keep = v > t
        if self.last_tie >= start:
            ties = v == t
            ties[self.last_tie - start + 1 :] = False
            keep |= ties
        return keep


def topk_selection(stat: Source, n: int, k: int, block_size: int = DEFAULT_BLOCK_SIZE) -> Selection:
    """The exact top-``k`` of the float32 statistic ``stat`` over ``n`` flat positions (``0 <= k <= n``).

    Holds one float32 copy of the statistic: the k-th largest value ``t`` comes from an in-place partition; when only
    some of the values equal to ``t`` fit, a second pass over ``stat`` finds the flat index of the last one kept.
    """
    if not 0 <= k <= n:
        raise MergeError(f"top-k: k = {k} outside [0, {n}]")
    if k == 0:
        return Selection.empty()
    values = np.empty(n, np.float32)
    for start in range(0, n, block_size):
        values[start : start + block_size] = stat(start, min(n, start + block_size))
    values.partition(n - k)
    t = values[n - k]
    above = int(np.count_nonzero(values > t))
    tied = int(np.count_nonzero(values == t))
    del values
    quota = k - above
    if quota == tied:
        return Selection(float(t), n - 1)
    seen = 0
    for start in range(0, n, block_size):
        ties = np.flatnonzero(stat(start, min(n, start + block_size)) == t)
        if seen + len(ties) >= quota:
            return Selection(float(t), start + int(ties[quota - seen - 1]))
        seen += len(ties)
    raise AssertionError("unreachable: fewer ties than counted")


def topk_mask(values, k: int) -> np.ndarray:
    """Boolean mask (shape of ``values``) of the ``k`` largest values; ties at the k-th value by lower flat index."""
    flat = np.asarray(values, np.float32).reshape(-1)
    selection = topk_selection(lambda a, b: flat[a:b], flat.size, k, block_size=max(1, flat.size))
    return selection.mask(flat, 0).reshape(np.shape(values))


def dare_keep_mask(key: Sequence[int], start: int, stop: int, density: float) -> np.ndarray:
    """DARE keep mask of flat positions ``[start, stop)``: ``u < density`` with ``u ~ U[0, 1)`` from PCG64 seeded by
    ``key`` and advanced to ``start`` (one draw per position), so any block of the mask equals that block of the whole.
    """
    generator = np.random.PCG64(np.random.SeedSequence([int(k) for k in key]))
    generator.advance(start)
    return np.random.Generator(generator).random(stop - start) < density


# --------------------------------------------------------------------------------------------------------------------
# per-method statistics and blocks


def _blocks(n: int, block_size: int):
    for start in range(0, n, block_size):
        yield start, min(n, start + block_size)


def _sum_sq(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    return float(np.dot(x, x))


def _variance(deltas: list[np.ndarray]) -> np.ndarray:
    """Population variance over models, elementwise: ``Σ (δ_m − mean)² / M``, in float32 (a fixed loop order)."""
    mean = deltas[0].copy()
    for d in deltas[1:]:
        mean += d
    mean /= np.float32(len(deltas))
    var = np.zeros_like(mean)
    for d in deltas:
        var += np.square(d - mean)
    var /= np.float32(len(deltas))
    return var


def sce_weights(sum_squares: Sequence[float], n: int, variant: str = "mergekit") -> np.ndarray:
    """SCE "calculate": ``w_m = Σ(masked δ_m)² / n``, ``η_m = w_m / Σ w``; uniform ``1/M`` when ``|Σ w| < 1e-6``
    (mergekit 0.1.x) or when ``Σ w == 0`` (FuseChat). RL-sized deltas (rms ~1e-3) fall back to uniform in mergekit."""
    w = np.asarray(sum_squares, np.float64) / n
    total = float(w.sum())
    uniform = abs(total) < SCE_WEIGHT_EPS if variant == "mergekit" else total == 0.0
    return np.full(len(w), 1.0 / len(w)) if uniform else w / total


class _Merger:
    """One tensor's merge: ``__init__`` runs the whole-tensor passes (top-k, norms, SCE weights); ``block`` then
    produces any block of the float32 result from the sources alone."""

    def __init__(self, p: MergeParams, base: Source, models: Sequence[Source], n: int, block_size: int, key):
        self.p, self.base, self.models, self.n, self.key = p, base, list(models), n, tuple(key)
        self.block_size = block_size
        if not self.models:
            return
        if p.method == "sce":
            self._prepare_sce()
        elif p.method != "linear":
            self._prepare_gta()

    def deltas(self, start: int, stop: int) -> tuple[np.ndarray, list[np.ndarray]]:
        b = self.base(start, stop)
        return b, [x(start, stop) - b for x in self.models]

    # ---- task arithmetic / TIES / DARE

    def _prepare_gta(self):
        p, n = self.p, self.n
        kind = _SPARSIFY[p.method]
        self.selections: list[Selection | None] = [None] * len(self.models)
        self.scales = [np.float32(1.0)] * len(self.models)
        for m, density in enumerate(p.densities):
            if kind is None or density >= 1.0:
                continue
            if kind == "magnitude":

                def stat(a, b, m=m):
                    return np.abs(self.models[m](a, b) - self.base(a, b))

                self.selections[m] = topk_selection(stat, n, int(density * n), self.block_size)
            if p.rescale:
                before = after = 0.0
                for a, b in _blocks(n, self.block_size):
                    magnitude = np.abs(self.models[m](a, b) - self.base(a, b))
                    before += float(magnitude.sum(dtype=np.float64))
                    after += float(magnitude[self._keep(m, magnitude, a, b)].sum(dtype=np.float64))
                if before >= RESCALE_EPS and after >= RESCALE_EPS:
                    self.scales[m] = np.float32(before / after)

    def _keep(self, m: int, abs_delta: np.ndarray, start: int, stop: int) -> np.ndarray:
        if _SPARSIFY[self.p.method] == "magnitude":
            return self.selections[m].mask(abs_delta, start)
        return dare_keep_mask((*self.key, m), start, stop, self.p.densities[m])

    def _gta_block(self, start: int, stop: int) -> np.ndarray:
        p = self.p
        b, deltas = self.deltas(start, stop)
        sparse = _SPARSIFY[p.method] is not None
        us = []
        for m, (delta, w) in enumerate(zip(deltas, p.weights, strict=True)):
            if sparse and p.densities[m] < 1.0:
                delta = np.where(self._keep(m, np.abs(delta), start, stop), delta, np.float32(0)) * self.scales[m]
            us.append(delta * np.float32(w))
        mixed = np.zeros_like(b)
        if p.method in ("ties", "dare_ties"):
            total = np.zeros_like(b)
            for u in us:
                total += u
            sign = np.where(total >= 0, np.float32(1), np.float32(-1))
            divisor = np.zeros_like(b)
            for u, w in zip(us, p.weights, strict=True):
                agree = np.sign(u) == sign
                mixed += np.where(agree, u, np.float32(0))
                divisor += agree * np.float32(w)
            divisor[divisor == 0] = 1
        else:
            for u in us:
                mixed += u
            divisor = np.float32(sum(p.weights))
            if abs(divisor) < NORMALIZE_EPS:
                divisor = np.float32(1)
        if p.normalize:
            mixed /= divisor
        return b + mixed * np.float32(p.lam)

    # ---- SCE

    def _prepare_sce(self):
        """Select: (only when τ < 1) the mask keeps the ``k = floor(τ · nnz(v))`` positions of largest
        ``v = Var_m(δ)`` (population variance, per tensor; τ = 0 or k = 0 keeps nothing, zero-variance positions are
        never kept). Calculate: :func:`sce_weights` of the masked task vectors."""
        p, n = self.p, self.n
        self.selection = None
        if p.select_topk < 1.0:
            if p.select_topk <= 0.0:
                self.selection = Selection.empty()
            else:
                nonzero = 0
                for a, b in _blocks(n, self.block_size):
                    nonzero += int(np.count_nonzero(_variance(self.deltas(a, b)[1])))
                k = int(p.select_topk * nonzero)
                self.selection = topk_selection(lambda a, b: _variance(self.deltas(a, b)[1]), n, k, self.block_size)
        sums = [0.0] * len(self.models)
        for a, b in _blocks(n, self.block_size):
            _, deltas = self.deltas(a, b)
            keep = None if self.selection is None else self.selection.mask(_variance(deltas), a)
            for m, d in enumerate(deltas):
                sums[m] += _sum_sq(d if keep is None else d[keep])
        self.eta = sce_weights(sums, n, p.variant).astype(np.float32)

    def _sce_block(self, start: int, stop: int) -> np.ndarray:
        """Erase and merge. mergekit: ``T_m`` = masked ``δ_m``; ``s = +1 where Σ T_m ≥ 0 else −1``;
        ``E_m = [sign(T_m) == s]``; ``B + Σ η_m E_m T_m / max(Σ η_m E_m, 1e-6)``. FuseChat: the same on the unmasked
        ``δ_m`` (the mask only shapes η) with a divisor of 0 counted as 1."""
        b, deltas = self.deltas(start, stop)
        if self.selection is not None and self.p.variant == "mergekit":
            keep = self.selection.mask(_variance(deltas), start)
            deltas = [np.where(keep, d, np.float32(0)) for d in deltas]
        total = np.zeros_like(b)
        for d in deltas:
            total += d
        sign = np.where(total >= 0, np.float32(1), np.float32(-1))
        num = np.zeros_like(b)
        den = np.zeros_like(b)
        for d, eta in zip(deltas, self.eta, strict=True):
            agree = np.sign(d) == sign
            num += np.where(agree, d * eta, np.float32(0))
            den += agree * eta
        if self.p.variant == "mergekit":
            den = np.maximum(den, np.float32(SCE_WEIGHT_EPS))
        else:
            den[den == 0] = 1
        return b + num / den

    # ---- linear

    def _linear_block(self, start: int, stop: int) -> np.ndarray:
        out = np.zeros(stop - start, np.float32)
        for x, w in zip(self.models, self.p.weights, strict=True):
            out += x(start, stop) * np.float32(w)
        if self.p.normalize:
            out /= np.float32(sum(self.p.weights))
        return out

    def block(self, start: int, stop: int) -> np.ndarray:
        """The merged float32 values at flat positions ``[start, stop)``."""
        if not self.models:
            return self.base(start, stop).copy()
        if self.p.method == "sce":
            return self._sce_block(start, stop)
        if self.p.method == "linear":
            return self._linear_block(start, stop)
        return self._gta_block(start, stop)


def merge_flat(
    p: MergeParams,
    base: Source,
    models: Sequence[Source],
    out: np.ndarray,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    key: Sequence[int] = (),
) -> np.ndarray:
    """Merge one flat tensor of ``len(out)`` elements from block sources into ``out`` (any float dtype; cast once).

    ``key`` (ints) identifies the tensor for the DARE mask, which is seeded by ``(p.seed, *key, model index)``.
    Host memory: one float32 copy of the tensor for a top-k, plus a few float32 blocks of ``block_size``.
    """
    n = out.size
    if len(models) != len(p.weights):
        raise MergeError(f"{len(models)} models but {len(p.weights)} weights")
    if p.method == "linear":
        if not models:
            raise MergeError("linear needs at least one model")
        if p.normalize and sum(p.weights) == 0:
            raise MergeError("linear with normalize=True needs weights with a nonzero sum")
    if 0 < n <= block_size:  # one block: read each input once and reuse it across the passes
        cached = [src(0, n) for src in (base, *models)]
        base, models = (lambda a, b, x=cached[0]: x[a:b]), [lambda a, b, x=x: x[a:b] for x in cached[1:]]
    merger = _Merger(p, base, models, n, block_size, (p.seed, *key))
    for a, b in _blocks(n, block_size):
        out[a:b] = merger.block(a, b)
    return out


def _flat_source(x: np.ndarray) -> Source:
    flat = x.reshape(-1)
    return lambda a, b: flat[a:b].astype(np.float32)


def merge_tensor(method: str, base, models: Sequence, *, block_size: int = DEFAULT_BLOCK_SIZE, **params):
    """Merge one tensor: ``base`` and each of ``models`` are arrays of one shape (numpy or jax, any float dtype).

    ``method`` is one of ``METHODS``; ``params`` are mergekit's: ``weights``, ``densities``, ``normalize``, ``lam``,
    ``rescale``, ``seed`` (DARE), ``select_topk`` and ``variant`` (SCE); see :class:`MergeParams` for meanings and
    defaults and the module docstring for each formula. No models returns the base. The result has the base's shape
    and dtype (a jax array for a jax base); ``block_size`` changes memory use, never the result.
    """
    base_np = np.asarray(base)
    arrays = [np.asarray(x) for x in models]
    for m, x in enumerate(arrays):
        if x.shape != base_np.shape:
            raise MergeError(f"models[{m}] has shape {list(x.shape)}, the base {list(base_np.shape)}")
    for name, x in (("base", base_np), *((f"models[{m}]", x) for m, x in enumerate(arrays))):
        if not np.issubdtype(x.dtype, np.floating) and x.dtype != jnp.bfloat16:
            raise MergeError(f"{name} has non-float dtype {x.dtype}")
    p = merge_params(method, len(arrays), **params)
    out = np.empty(base_np.size, base_np.dtype)
    merge_flat(p, _flat_source(base_np), [_flat_source(x) for x in arrays], out, block_size=block_size)
    out = out.reshape(base_np.shape)
    return jnp.asarray(out) if isinstance(base, jax.Array) else out
