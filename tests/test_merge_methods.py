"""qlx.merge.merge_tensor: every method against an independent float64 implementation written from mergekit 0.1.x's
rules (stacked arrays, argsort top-k), hand-computed degenerate cases, exact ties, blockwise = whole, bf16 and jax."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qlx.merge import METHODS, MergeError, merge_tensor, topk_mask

# ----------------------------------------------------------------------------------------------- float64 references


def ref_topk(v, k):
    mask = np.zeros(v.size, bool)
    mask[np.argsort(-v.reshape(-1), kind="stable")[:k]] = True
    return mask.reshape(v.shape)


def ref_gta(method, base, models, weights, densities, normalize, lam, rescale, seed=0):
    b = base.astype(np.float64)
    deltas = []
    for m, x in enumerate(models):
        d = x.astype(np.float64) - b
        if method != "task_arithmetic" and densities[m] < 1:
            if method == "ties":
                mask = ref_topk(np.abs(d), int(densities[m] * d.size))
            else:
                gen = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, m])))
                mask = (gen.random(d.size) < densities[m]).reshape(d.shape)
            masked = d * mask
            before, after = np.abs(d).sum(), np.abs(masked).sum()
            if rescale and before >= 1e-7 and after >= 1e-7:
                masked = masked * (before / after)
            d = masked
        deltas.append(d)
    w = np.asarray(weights, np.float64).reshape(-1, *([1] * b.ndim))
    u = np.stack(deltas) * w
    if method in ("ties", "dare_ties"):
        sign = np.where(u.sum(0) >= 0, 1.0, -1.0)
        agree = np.sign(u) == sign
        mixed, div = (u * agree).sum(0), (w * agree).sum(0)
        div[div == 0] = 1
    else:
        mixed, div = u.sum(0), w.sum()
        div = 1.0 if abs(div) < 1e-8 else div
    if normalize:
        mixed = mixed / div
    return b + lam * mixed


def ref_sce(base, models, topk=1.0, variant="mergekit"):
    b = base.astype(np.float64)
    t = np.stack([x.astype(np.float64) - b for x in models])
    masked = t
    if topk < 1:
        var = t.var(0)
        k = int(topk * np.count_nonzero(var)) if topk > 0 else 0
        masked = t * ref_topk(var, k)
    w = (masked**2).reshape(len(models), -1).mean(1)
    small = abs(w.sum()) < 1e-6 if variant == "mergekit" else w.sum() == 0
    eta = np.full(len(w), 1 / len(w)) if small else w / w.sum()
    t = masked if variant == "mergekit" else t
    eta = eta.reshape(-1, *([1] * b.ndim))
    agree = np.sign(t) == np.where(t.sum(0) >= 0, 1.0, -1.0)
    den = (eta * agree).sum(0)
    den = np.maximum(den, 1e-6) if variant == "mergekit" else np.where(den == 0, 1.0, den)
    return b + (eta * agree * t).sum(0) / den


def ref_linear(models, weights, normalize):
    w = np.asarray(weights, np.float64).reshape(-1, *([1] * models[0].ndim))
    out = (np.stack([x.astype(np.float64) for x in models]) * w).sum(0)
    return out / w.sum() if normalize else out


# ----------------------------------------------------------------------------------------------- inputs


def normal_inputs(num_models=3, shape=(12, 17), scale=0.1, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32)
    return base, [(base + scale * rng.normal(size=shape)).astype(np.float32) for _ in range(num_models)]


def grid_inputs(num_models=2, shape=(9, 7), seed=0):
    """Values on a 1/8 grid (exact in float32 and bf16; many exact ties in |δ| and in the variance)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-8, 9, shape).astype(np.float32) / 8
    return base, [base + rng.integers(-3, 4, shape).astype(np.float32) / 8 for _ in range(num_models)]


CASES = [
    ("linear", dict(weights=[0.5, 1.0, 2.0])),
    ("linear", dict(weights=[1.0, -0.5, 2.0], normalize=False)),
    ("task_arithmetic", dict(weights=[0.5, 1.0, 0.3], lam=0.7)),
    ("task_arithmetic", dict(weights=[0.5, 1.0, 0.3], normalize=True)),
    ("ties", dict(weights=[1.0, 0.5, -0.7], densities=[0.3, 0.5, 1.0])),
    ("ties", dict(weights=[1.0, 0.5, 0.7], densities=0.4, rescale=True, normalize=False, lam=1.5)),
    ("dare_ties", dict(weights=[1.0, 0.5, 0.7], densities=[0.3, 0.6, 0.9], seed=3)),
    ("dare_linear", dict(weights=[1.0, 0.5, 0.7], densities=0.5, rescale=False, seed=1)),
    ("dare_linear", dict(weights=[1.0, 0.5, 0.7], densities=0.5, normalize=True)),
    ("sce", dict()),
    ("sce", dict(select_topk=0.3)),
    ("sce", dict(select_topk=0.3, variant="fusechat")),
    ("sce", dict(select_topk=1.0, variant="fusechat")),
]


def reference(method, base, models, params):
    if method == "sce":
        return ref_sce(base, models, params.get("select_topk", 1.0), params.get("variant", "mergekit"))
    n = len(models)
    weights = np.broadcast_to(np.asarray(params.get("weights", 1.0), float), (n,))
    if method == "linear":
        return ref_linear(models, weights, params.get("normalize", True))
    densities = np.broadcast_to(np.asarray(params.get("densities", 1.0), float), (n,))
    normalize = params.get("normalize", method == "ties")
    rescale = params.get("rescale", method.startswith("dare"))
    return ref_gta(method, base, models, weights, densities, normalize, params.get("lam", 1.0), rescale,
                   params.get("seed", 0))  # fmt: skip


# ----------------------------------------------------------------------------------------------- vs references


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_methods_match_float64_reference(method, params):
    base, models = normal_inputs()
    got = merge_tensor(method, base, models, **params)
    assert got.dtype == np.float32 and got.shape == base.shape
    np.testing.assert_allclose(got, reference(method, base, models, params), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("method,params", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_grid_inputs_with_ties_exact_and_blockwise(method, params):
    """Grid values make float32 exact, so the result equals the reference at float32 precision, ties included, and
    merging in blocks of 5 elements (ties at the top-k threshold straddle blocks) is bit-identical to one block."""
    base, models = grid_inputs(num_models=4 if method == "sce" else 3)
    whole = merge_tensor(method, base, models, **params)
    np.testing.assert_allclose(whole, reference(method, base, models, params), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(merge_tensor(method, base, models, block_size=5, **params), whole)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_inputs_give_bf16_equal_to_rounded_reference(method):
    base, models = grid_inputs(num_models=2)
    bf = ml_dtypes.bfloat16
    params = {} if method == "sce" else dict(weights=[0.5, 0.5])
    got = merge_tensor(method, base.astype(bf), [x.astype(bf) for x in models], **params)
    assert got.dtype == bf
    want = reference(method, base, models, params).astype(np.float32).astype(bf)
    np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))


def test_jax_arrays_in_jax_array_out():
    base, models = normal_inputs(num_models=2)
    got = merge_tensor("sce", jnp.asarray(base), [jnp.asarray(x) for x in models], select_topk=0.5)
    assert isinstance(got, jnp.ndarray)
    np.testing.assert_array_equal(np.asarray(got), merge_tensor("sce", base, models, select_topk=0.5))


# ----------------------------------------------------------------------------------------------- hand-computed cases


def test_topk_mask_exact_ties_lower_index_first():
    v = np.array([1.0, 3.0, 2.0, 3.0, 3.0, 0.0])
    np.testing.assert_array_equal(topk_mask(v, 2), [0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(topk_mask(v, 4), [0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(topk_mask(v, 0), [0] * 6)
    np.testing.assert_array_equal(topk_mask(v, 6), [1] * 6)


def test_sce_select_keeps_top_variance_never_zero_variance():
    """v = ((X1 − X2)/2)² = [0, 1, 0, 4]; nnz = 2, τ = 0.5 → k = 1: only position 3 kept. w = [25, 1]/4 →
    η = [25, 1]/26. mergekit: position 3 gets (25·5 + 1·1)/26, the rest the base. FuseChat: same η, but erase/merge
    on the unmasked deltas: [1, 2 (the zero delta never agrees), 0 (divisor 0 → 1), 126/26]."""
    base = np.zeros(4, np.float32)
    models = [np.array([1, 2, 0, 5], np.float32), np.array([1, 0, 0, 1], np.float32)]
    mk = merge_tensor("sce", base, models, select_topk=0.5)
    np.testing.assert_allclose(mk, [0, 0, 0, 126 / 26], rtol=1e-6)
    fc = merge_tensor("sce", base, models, select_topk=0.5, variant="fusechat")
    np.testing.assert_allclose(fc, [1, 2, 0, 126 / 26], rtol=1e-6)
    # τ = 0.4: k = floor(0.8) = 0 → nothing selected: base (mergekit); uniform η on the full deltas (FuseChat)
    np.testing.assert_array_equal(merge_tensor("sce", base, models, select_topk=0.4), base)
    np.testing.assert_allclose(
        merge_tensor("sce", base, models, select_topk=0.4, variant="fusechat"), [1, 2, 0, 3], rtol=1e-6
    )


def test_sign_conflicts_and_zero_sum():
    """TIES: Σ = [1, −4] → s = [+, −]; pos 0 keeps only X1 (2/1), pos 1 both (−4/2); a sum of exactly 0 counts as +.
    SCE: w = [6, 11]/3 → η = [6, 11]/17; pos 0: 2, pos 1: −(η1 + 3 η2), pos 2: 1."""
    base = np.zeros(3, np.float32)
    models = [np.array([2, -1, 1], np.float32), np.array([-1, -3, -1], np.float32)]
    np.testing.assert_allclose(merge_tensor("ties", base, models, weights=[1, 1]), [2, -2, 1], rtol=1e-6)
    sce = merge_tensor("sce", base, models)
    eta = np.array([6, 11]) / 17  # w = [(4+1+1)/3, (1+9+1)/3]
    np.testing.assert_allclose(sce, [2, -(eta[0] + 3 * eta[1]), 1], rtol=1e-6)
    # a negative weight flips the vote: u2 = [1, 3, 1], Σ u = [3, 2, 2] → all +; pos 0: both agree, divisor
    # 1 + (−1) = 0 → 1: 3; pos 1: only u2 agrees, divisor −1: 3 / −1; pos 2: both agree: 2 / 1
    ties_neg = merge_tensor("ties", base, models, weights=[1, -1])
    np.testing.assert_allclose(ties_neg, [3, -3, 2], rtol=1e-6)


def test_single_model_and_identical_models():
    base, (x,) = normal_inputs(num_models=1)
    np.testing.assert_allclose(merge_tensor("sce", base, [x]), x, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(merge_tensor("sce", base, [x], select_topk=0.5), base)  # v ≡ 0 → k = 0
    np.testing.assert_allclose(merge_tensor("sce", base, [x], select_topk=0.5, variant="fusechat"), x, atol=1e-7)
    np.testing.assert_allclose(merge_tensor("ties", base, [x], weights=0.3), x, atol=1e-6)  # normalized: weight cancels
    np.testing.assert_allclose(merge_tensor("task_arithmetic", base, [x], weights=0.5), (base + x) / 2, atol=1e-6)
    np.testing.assert_allclose(merge_tensor("linear", base, [x], weights=0.3), x, rtol=1e-6)
    # identical models at τ < 1 revert to the base (mergekit) and keep the shared delta (FuseChat)
    np.testing.assert_array_equal(merge_tensor("sce", base, [x, x], select_topk=0.5), base)
    np.testing.assert_allclose(merge_tensor("sce", base, [x, x], select_topk=0.5, variant="fusechat"), x, atol=1e-7)
    for method in METHODS[1:]:  # no models: the base
        np.testing.assert_array_equal(merge_tensor(method, base, []), base)


def test_ties_k_zero_keeps_nothing():
    base = np.zeros(5, np.float32)
    models = [np.array([1, 2, 3, 4, 5], np.float32), np.array([1, 1, 1, 1, 1], np.float32)]
    # density 0.1 of 5 elements: k = 0, the first model contributes nothing
    np.testing.assert_allclose(merge_tensor("ties", base, models, densities=[0.1, 1.0]), [1] * 5)
    # density 0.4: k = 2, the two largest |δ| of model 0 survive
    np.testing.assert_allclose(merge_tensor("ties", base, models, densities=[0.4, 1.0]), [1, 1, 1, 2.5, 3])


def test_rl_sized_deltas_fall_back_to_uniform_weights_in_mergekit_only():
    """δ1 = 1e-4, δ2 = 2e-4 everywhere: Σ mean(δ²) = 5e-8 < 1e-6 → mergekit η = [½, ½] → 1.5e-4; FuseChat keeps
    η = [1, 4]/5 → 1.8e-4."""
    base = np.zeros(64, np.float32)
    models = [np.full(64, 1e-4, np.float32), np.full(64, 2e-4, np.float32)]
    np.testing.assert_allclose(merge_tensor("sce", base, models), 1.5e-4, rtol=1e-5)
    np.testing.assert_allclose(merge_tensor("sce", base, models, variant="fusechat"), 1.8e-4, rtol=1e-5)


def test_dare_mask_rate_rescale_and_seed():
    base, (x,) = normal_inputs(num_models=1, shape=(200, 100))
    out = merge_tensor("dare_linear", base, [x], densities=0.3, seed=7)
    kept = out != base
    assert abs(kept.mean() - 0.3) < 0.01
    # L1 rescale: the kept deltas' L1 equals the full delta's
    np.testing.assert_allclose(np.abs(out - base).sum(), np.abs(x - base).sum(), rtol=1e-4)
    np.testing.assert_array_equal(merge_tensor("dare_linear", base, [x], densities=0.3, seed=7), out)
    assert not np.array_equal(merge_tensor("dare_linear", base, [x], densities=0.3, seed=8), out)


def test_bad_parameters_are_refused_by_name():
    base, models = normal_inputs(num_models=2)
    with pytest.raises(MergeError, match="select_topk"):
        merge_tensor("ties", base, models, select_topk=0.5)
    with pytest.raises(MergeError, match="weights: 3 values for 2 models"):
        merge_tensor("linear", base, models, weights=[1, 2, 3])
    with pytest.raises(MergeError, match=r"densities\[1\]"):
        merge_tensor("ties", base, models, densities=[0.5, 1.5])
    with pytest.raises(MergeError, match=r"models\[1\] has shape"):
        merge_tensor("sce", base, [models[0], models[1][:3]])
    with pytest.raises(MergeError, match="nonzero sum"):
        merge_tensor("linear", base, models, weights=[1, -1])
    with pytest.raises(MergeError, match="method 'slerp'"):
        merge_tensor("slerp", base, models)
    with pytest.raises(MergeError, match="variant"):
        merge_tensor("sce", base, models, variant="orig")
