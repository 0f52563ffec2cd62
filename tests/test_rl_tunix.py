"""Agreement with tunix's GRPO loss and helpers (google-tunix==0.1.7, a test-only dependency).

tunix's ``grpo_loss_fn`` computes log-probs from a model; here ``compute_per_token_logps`` is replaced by a stub that
returns given log-probs and logits, so both sides see identical inputs and only the loss algebra is compared.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

tunix_algo = pytest.importorskip(
    "tunix.rl.algo_core", reason="test-only dependency google-tunix==0.1.7 (pip install --no-deps, see BUILD_NOTES)"
)
from flax import nnx  # noqa: E402
from tunix.rl import common as tunix_common  # noqa: E402

from qlx.rl import aggregate, group_advantages, policy_loss, token_logprobs_and_entropy  # noqa: E402


def _case(seed, b=6, t=8, v=11, d=5, temperature=0.7):
    k = jax.random.split(jax.random.key(seed), 7)
    hidden = jax.random.normal(k[0], (b, t, d))
    lm_head = jax.random.normal(k[1], (d, v))
    targets = jax.random.randint(k[2], (b, t), 0, v)
    lengths = jax.random.randint(k[3], (b,), 1, t + 1).at[0].set(t)
    mask = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.int32)
    logits = jnp.einsum("btd,dv->btv", hidden, lm_head) / temperature
    logp = tunix_common.selective_log_softmax(logits, targets)
    old = logp + 0.4 * jax.random.normal(k[4], (b, t))
    ref = logp + 0.3 * jax.random.normal(k[5], (b, t))
    adv = jax.random.normal(k[6], (b,))
    return dict(
        hidden=hidden, lm_head=lm_head, targets=targets, mask=mask, logits=logits, logp=logp, old=old, ref=ref, adv=adv
    )


def _tunix_grpo(monkeypatch, c, *, agg, clip_high, dual_clip, beta, kl_mode):
    monkeypatch.setattr(tunix_common, "compute_per_token_logps", lambda *a, **k: (c["logp"], c["logits"]))
    config = types.SimpleNamespace(
        beta=beta,
        epsilon=0.2,
        epsilon_high=clip_high,
        epsilon_c=dual_clip,
        loss_algo="grpo",
        loss_agg_mode=agg,
        temperature=0.7,
        kl_loss_mode=kl_mode,
        kl_clamp_value=None,
    )
    example = tunix_common.TrainExample(
        prompt_ids=jnp.zeros((c["mask"].shape[0], 1), jnp.int32),
        prompt_mask=jnp.ones((c["mask"].shape[0], 1)),
        completion_ids=c["targets"],
        completion_mask=c["mask"],
        advantages=c["adv"],
        ref_per_token_logps=c["ref"],
        old_per_token_logps=c["old"],
    )
    model = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
    return tunix_algo.grpo_loss_fn(model, example, config, pad_id=0, eos_id=1)


@pytest.mark.parametrize("agg", ["token-mean", "sequence-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize(
    ("clip_high", "dual_clip", "beta", "kl_mode"),
    [
        (0.2, None, 0.0, "low_var_kl"),
        (0.28, 3.0, 0.05, "low_var_kl"),
        (0.2, 3.0, 0.1, "kl"),
        (0.3, None, 0.1, "mse_kl"),
    ],
)
def test_grpo_loss_matches_tunix(monkeypatch, agg, clip_high, dual_clip, beta, kl_mode):
    c = _case(sum(map(ord, f"{agg}{clip_high}{beta}{kl_mode}")))
    want, aux = _tunix_grpo(
        monkeypatch, c, agg=agg, clip_high=clip_high, dual_clip=dual_clip, beta=beta, kl_mode=kl_mode
    )
    got, metrics = policy_loss(
        c["logp"],
        c["old"],
        c["adv"],
        c["mask"],
        clip_low=0.2,
        clip_high=clip_high,
        dual_clip=dual_clip,
        agg=agg,
        ref_logp=c["ref"],
        kl_coef=beta,
        kl=kl_mode,
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["pg_loss"], aux["pg_loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["kl_loss"], aux["kl_loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["pg_clipfrac"], aux["pg_clipfrac"], rtol=1e-5, atol=1e-6)
    if agg == "token-mean":  # tunix aggregates this metric with the loss mode; verl and qlx use a token mean
        np.testing.assert_allclose(metrics["pg_clipfrac_lower"], aux["pg_clipfrac_lower"], rtol=1e-5, atol=1e-6)
    # the entropy tunix logs, from our chunked log-probs/entropy of the same hidden states
    logp, ent = token_logprobs_and_entropy(
        c["hidden"], c["lm_head"], c["targets"], temperature=0.7, chunk=7, vocab_chunk=4
    )
    np.testing.assert_allclose(logp, c["logp"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aggregate(ent, c["mask"], agg), aux["entropy"], rtol=1e-5, atol=1e-5)


def test_sum_norm_matches_tunix_with_verl_constant_norm():
    c = _case(7)
    per_token = jax.random.normal(jax.random.key(8), c["mask"].shape)
    t = c["mask"].shape[1]
    want = tunix_common.aggregate_loss(per_token, c["mask"], "sequence-mean-token-sum-norm", norm=t)
    np.testing.assert_allclose(aggregate(per_token, c["mask"], "seq-mean-token-sum-norm"), want, rtol=1e-6)


def test_group_advantages_match_tunix_grpo_advantages():
    rewards = np.asarray(jax.random.uniform(jax.random.key(3), (24,)))
    want = tunix_algo.compute_advantages(rewards, num_generations=8)
    got = group_advantages(jnp.asarray(rewards), jnp.repeat(jnp.arange(3), 8))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
