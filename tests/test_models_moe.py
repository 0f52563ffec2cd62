"""MoE: blocked and ragged expert compute (values and gradients) vs the plain reference, the blocked layout's
invariants, routing, and the load-balancing loss vs transformers' load_balancing_loss_func."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from qlx.models.moe import (
    expert_outputs_reference,
    experts,
    load_balancing_loss,
    resolve_backend,
    route,
    router_stats,
)
from qlx.models.moe_blocked import (
    block_layout,
    blocked_moe,
    blocked_moe_reference,
    effective_block_size,
    num_blocks,
    split_experts,
)

T, K, E, D, I, BLOCK = 37, 2, 6, 16, 12, 8


def random_problem(seed: int, skewed: bool, tokens: int = T):
    """Inputs of a MoE layer; ``skewed`` routes most tokens to experts 0 and 1 and leaves experts 4, 5 empty.

    Weights: w_gate_up [E, D, 2, I] (gate, up) and w_down [E, I, D]."""
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.normal(size=(tokens, D)), jnp.float32)
    logits = r.normal(size=(tokens, E))
    if skewed:
        logits[:, :2] += 4.0
        logits[:, 4:] -= 50.0
    weights, experts_tk, _ = route(jnp.asarray(logits), K, normalize=True)
    w = [jnp.asarray(r.normal(size=s) / np.sqrt(s[1]), jnp.float32) for s in ((E, D, 2, I), (E, I, D))]
    return x, weights, experts_tk, w


def reference_experts(x, weights, experts_tk, w_gate_up, w_down):
    return jnp.einsum("tkd,tk->td", expert_outputs_reference(x, experts_tk, w_gate_up, w_down), weights)


def test_reference_is_per_token_swiglu():
    """The gathered reference equals a per-token loop of silu(x Wg) * (x Wu) @ Wd in float64 numpy."""
    x, weights, experts_tk, (w_gate_up, w_down) = random_problem(5, skewed=False, tokens=4)
    got = reference_experts(x, weights, experts_tk, w_gate_up, w_down)
    x, weights, w_gate_up, w_down = (np.asarray(a, np.float64) for a in (x, weights, w_gate_up, w_down))
    want = np.zeros_like(x)
    for t, row in enumerate(np.asarray(experts_tk)):
        for j, e in enumerate(row):
            gate, up = x[t] @ w_gate_up[e, :, 0], x[t] @ w_gate_up[e, :, 1]
            want[t] += weights[t, j] * ((gate / (1 + np.exp(-gate)) * up) @ w_down[e])
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize(("skewed", "tokens", "block_size"), [(False, T, BLOCK), (True, T, 64), (False, 3, 64)])
def test_backends_match_reference_values_and_gradients(skewed, tokens, block_size):
    """37 tokens (blocks of 8; block_size 64 shrunk to 16) and decode-sized 3 tokens (64 shrunk to 8)."""
    x, weights, experts_tk, (w_gate_up, w_down) = random_problem(0, skewed, tokens)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(tokens, D)), jnp.float32)

    def loss(fn):
        return lambda x, weights, w_gate_up, w_down: jnp.sum(fn(x, weights, experts_tk, w_gate_up, w_down) * cotangent)

    args = (x, weights, w_gate_up, w_down)
    want_value, want_grads = jax.value_and_grad(loss(reference_experts), argnums=range(4))(*args)
    for backend in ("blocked", "ragged"):
        fn = jax.jit(lambda *a, backend=backend: experts(*a, backend=backend, block_size=block_size))
        value, grads = jax.jit(jax.value_and_grad(loss(fn), argnums=range(4)))(*args)
        np.testing.assert_allclose(value, want_value, rtol=1e-5, err_msg=backend)
        for name, g, w in zip(("x", "weights", "w_gate_up", "w_down"), grads, want_grads, strict=True):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"{backend} d{name}")


def test_effective_block_size():
    """Blocks shrink to the next power of two >= the mean rows per expert (at least 8), never past block_size."""
    assert effective_block_size(8 * 4, 32, 128) == 8  # decode: batch 8, top-4 of 32 experts
    assert effective_block_size(100 * 4, 32, 128) == 16  # 12.5 rows per expert on average
    assert effective_block_size(4096 * 4, 32, 128) == 128
    assert effective_block_size(4096 * 4, 32, 64) == 64


def test_blocked_moe_custom_vjp_matches_reference_autodiff():
    """Gradients of the scan (custom VJP) wrt x, row weights and expert weights equal autodiff of the reference."""
    x, weights, experts_tk, _ = random_problem(2, skewed=True)
    r = np.random.default_rng(3)
    w = [jnp.asarray(r.normal(size=s) / 4, jnp.float32) for s in ((E, D, 2 * I), (E, I, D))]
    layout = block_layout(experts_tk, E, BLOCK)
    row_weight = jnp.zeros(layout.row_token_p.shape).at[layout.slot_a].set(weights.reshape(-1))
    dy = jnp.asarray(r.normal(size=(T, D)), jnp.float32)
    static = (layout.row_token_p, layout.block_expert_n)

    def kernel(x, row_weight, *w):
        return jnp.sum(blocked_moe(x, row_weight, split_experts(*w), *static, layout.num_used_blocks) * dy)

    def reference(x, row_weight, *w):
        return jnp.sum(blocked_moe_reference(x, row_weight, *w, *static) * dy)

    got = jax.jit(jax.value_and_grad(kernel, argnums=range(4)))(x, row_weight, *w)
    want = jax.jit(jax.value_and_grad(reference, argnums=range(4)))(x, row_weight, *w)
    for g, ww in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, ww, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_layout_invariants(seed):
    """Every assignment gets its own row in a block of its expert; nothing is dropped; padding rows are empty."""
    _, _, experts_tk, _ = random_problem(seed, skewed=seed == 2)
    layout = jax.tree.map(np.asarray, block_layout(experts_tk, E, BLOCK))
    flat = np.asarray(experts_tk).reshape(-1)
    assert layout.row_token_p.shape == (num_blocks(T * K, E, BLOCK) * BLOCK,)
    assert len(set(layout.slot_a.tolist())) == T * K
    np.testing.assert_array_equal(layout.row_token_p[layout.slot_a], np.arange(T * K) // K)
    np.testing.assert_array_equal(layout.block_expert_n[layout.slot_a // BLOCK], flat)
    padding = np.setdiff1d(np.arange(layout.row_token_p.size), layout.slot_a)
    assert (layout.row_token_p[padding] == T).all()
    counts = np.bincount(flat, minlength=E)
    assert layout.num_used_blocks == sum(-(-c // BLOCK) for c in counts)
    assert (layout.slot_a // BLOCK < layout.num_used_blocks).all()


def test_route_top_k_and_renormalisation():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(5, E)), jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    raw, idx, _ = route(logits, 3, normalize=False)
    np.testing.assert_array_equal(idx, np.argsort(-np.asarray(probs), axis=-1)[:, :3])
    np.testing.assert_allclose(raw, np.take_along_axis(np.asarray(probs), np.asarray(idx), axis=-1), rtol=1e-6)
    renormed, _, _ = route(logits, 3, normalize=True)
    np.testing.assert_allclose(renormed, raw / raw.sum(-1, keepdims=True), rtol=1e-6)


def test_load_balancing_loss_matches_transformers():
    r = np.random.default_rng(4)
    layer_logits = [r.normal(size=(T, E)).astype(np.float32) for _ in range(3)]
    counts = prob_sums = 0
    for logits in layer_logits:
        _, experts_tk, probs = route(jnp.asarray(logits), K, normalize=False)
        c, p = router_stats(experts_tk, probs)
        counts, prob_sums = counts + c, prob_sums + p
    ours = load_balancing_loss(counts, prob_sums, T * len(layer_logits), E)
    theirs = load_balancing_loss_func(tuple(torch.from_numpy(x) for x in layer_logits), E, K)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)


def test_load_balancing_loss_leaves_out_padding_as_transformers_attention_mask():
    """Padding tokens (valid_t False) count for nothing: equal to transformers' loss with the same attention_mask
    (2 rows of 18 tokens, the second half-padded), and unequal to the loss over every token."""
    r = np.random.default_rng(5)
    layer_logits = [r.normal(size=(36, E)).astype(np.float32) for _ in range(2)]
    mask_bt = np.ones((2, 18), bool)
    mask_bt[1, 9:] = False
    counts = prob_sums = 0
    for logits in layer_logits:
        _, experts_tk, probs = route(jnp.asarray(logits), K, normalize=False)
        c, p = router_stats(experts_tk, probs, jnp.asarray(mask_bt.reshape(-1)))
        counts, prob_sums = counts + c, prob_sums + p
    ours = load_balancing_loss(counts, prob_sums, int(mask_bt.sum()) * len(layer_logits), E)
    logits = tuple(torch.from_numpy(x) for x in layer_logits)
    theirs = load_balancing_loss_func(logits, E, K, attention_mask=torch.from_numpy(mask_bt.astype(np.int64)))
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    assert float(ours) != pytest.approx(float(load_balancing_loss_func(logits, E, K)), rel=1e-3)


def test_backend_names():
    assert resolve_backend("auto") == ("blocked" if jax.default_backend() == "cpu" else "ragged")
    with pytest.raises(ValueError, match="model.moe_backend.*'dense'"):
        resolve_backend("dense")
