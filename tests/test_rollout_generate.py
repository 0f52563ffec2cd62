"""qlx.rollout.generate against transformers on tiny random checkpoints: greedy tokens, log-probs of the sampling
distribution (teacher-forced through transformers and its logits warpers), the policy log-probs against the
trainer's recomputation, stop tokens, seeds, buckets, meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import qlx
from qlx.mesh import make_mesh
from qlx.models.cache import length_axes
from qlx.rl import token_logprobs_and_entropy
from qlx.rollout import SamplingSpec, generate, generate_rows, sampling_logprobs
from qlx.rollout.engine import _decode, _prefill_chunk

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    initializer_range=0.2,
)
VARIANTS = {
    "dense": (Qwen3Config, Qwen3ForCausalLM, dict(tie_word_embeddings=True)),
    "moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)),
}
PROMPT_LENGTHS = (7, 1, 19)
NEW = 12
# (temperature, top_p, top_k): the recipe's T 0.7 / top-p 0.95, unfiltered, greedy, top-k + top-p
CONTRACT_SETTINGS = [(0.7, 0.95, 0), (1.0, 1.0, 0), (0.0, 1.0, 0), (1.3, 0.8, 20)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{variant: (directory, transformers model)}: tiny random Hugging Face checkpoints written by transformers."""
    out = {}
    for i, (name, (config_cls, model_cls, extra)) in enumerate(VARIANTS.items()):
        torch.manual_seed(10 + i)
        model = model_cls(config_cls(**{**COMMON, **extra})).eval()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
    return out


@pytest.fixture(scope="module")
def models(checkpoints):
    return {name: qlx.load_hf(path) for name, (path, _) in checkpoints.items()}


def _prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, COMMON["vocab_size"], n).tolist() for n in PROMPT_LENGTHS]


def _hf_greedy(hf_model, prompt, max_new_tokens, eos_token_id=None):
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def _hf_teacher_forced(hf_model, prompt, generated, temperature, top_p, top_k):
    """Log-probs of ``generated`` under transformers' forward + its sampling warpers (temperature, top-k, top-p)."""
    with torch.no_grad():
        scores = hf_model(torch.tensor([prompt + generated[:-1]])).logits[0, len(prompt) - 1 :].double()
    if temperature == 0:
        logp = torch.log_softmax(scores, -1)
    else:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        logp = torch.log_softmax(scores, -1)
    return logp[torch.arange(len(generated)), torch.tensor(generated)].numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_matches_transformers_generate_token_for_token(variant, checkpoints, models):
    _, hf_model = checkpoints[variant]
    prompts = _prompts()
    result = generate(models[variant], prompts, max_new_tokens=NEW, temperature=0.0)
    assert result.finish_reasons == ("length",) * 3 and result.lengths.tolist() == [NEW] * 3
    for i, prompt in enumerate(prompts):
        expected = _hf_greedy(hf_model, prompt, NEW)
        assert result.sequences()[i] == expected, f"prompt {i} (length {len(prompt)})"
        np.testing.assert_allclose(
            result.logprobs[i], _hf_teacher_forced(hf_model, prompt, expected, 0.0, 1.0, 0), atol=1e-4
        )


@pytest.mark.parametrize(("temperature", "top_p", "top_k"), [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 0.8, 20)])
def test_sampled_logprobs_equal_teacher_forced_pass(temperature, top_p, top_k, checkpoints, models):
    _, hf_model = checkpoints["moe"]
    prompts = _prompts(1)
    result = generate(
        models["moe"], prompts, max_new_tokens=NEW, temperature=temperature, top_p=top_p, top_k=top_k, seed=5
    )
    for i, prompt in enumerate(prompts):
        tokens = result.sequences()[i]
        expected = _hf_teacher_forced(hf_model, prompt, tokens, temperature, top_p, top_k)
        assert np.isfinite(expected).all(), f"prompt {i}: a sampled token lies outside transformers' filtered set"
        np.testing.assert_allclose(result.logprobs[i, : len(tokens)], expected, atol=1e-4, err_msg=f"prompt {i}")


def test_policy_logprobs_equal_the_trainers_recomputation_and_the_nucleus_mass_links_them(models):
    """The contract of GenerateResult: policy_logprobs = log_softmax(z / T) over the whole vocabulary, which the
    trainer recomputes (mean |delta| <= 1e-5 in float32), and log_nucleus_mass = log S of the filtered set."""
    model = models["dense"]
    prompts = _prompts(2) + [[3, 1, 4, 1]]
    specs = [
        SamplingSpec(NEW, temperature=t, top_p=p, top_k=k, seed=1, stream=i)
        for i, (t, p, k) in enumerate(CONTRACT_SETTINGS)
    ]
    result = generate_rows(model, prompts, specs)
    assert result.lengths.tolist() == [NEW] * 4
    # the trainer's forward: every row teacher-forced at once (right padding cannot reach earlier positions)
    width = max(map(len, prompts)) + NEW
    tokens = np.zeros((4, width), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt) + NEW] = prompt + result.tokens[i].tolist()
    hidden_all = jax.jit(model.hidden_states)(jnp.asarray(tokens))
    w = model.lm_head_weight()
    filtered = jax.jit(sampling_logprobs)
    deltas = []
    for i, (prompt, (t, p, k)) in enumerate(zip(prompts, CONTRACT_SETTINGS, strict=True)):
        hidden = hidden_all[i, len(prompt) - 1 : len(prompt) - 1 + NEW]  # the states that drew the tokens
        trainer, _ = token_logprobs_and_entropy(hidden, w, jnp.asarray(result.tokens[i]), temperature=t or 1.0)
        deltas.append(np.abs(result.policy_logprobs[i] - np.asarray(trainer)))
        np.testing.assert_allclose(
            result.logprobs[i], result.policy_logprobs[i] - result.log_nucleus_mass[i], atol=1e-6
        )
        # log S recomputed from the teacher-forced logits: the policy mass of the tokens the filters keep
        logits = jnp.dot(hidden, w, preferred_element_type=jnp.float32)
        settings = [jnp.full((NEW,), x, dtype) for x, dtype in ((t, jnp.float32), (p, jnp.float32), (k, jnp.int32))]
        kept = np.isfinite(np.asarray(filtered(logits, *settings)))
        policy = np.asarray(jax.nn.softmax(logits / (t or 1.0), axis=-1), np.float64)
        log_mass = np.log(np.sum(np.where(kept, policy, 0.0), axis=-1))
        np.testing.assert_allclose(result.log_nucleus_mass[i], log_mass, atol=1e-5)
        if p == 1 and k == 0:
            assert np.all(result.log_nucleus_mass[i] == 0)
        else:
            assert np.all(result.log_nucleus_mass[i] < 0)
    deltas = np.concatenate(deltas)
    assert deltas.mean() <= 1e-5 and deltas.max() <= 1e-4, (deltas.mean(), deltas.max())
    unset = generate(model, prompts[:1], max_new_tokens=3, return_logprobs=False)
    assert not unset.policy_logprobs.any() and not unset.log_nucleus_mass.any()


def test_sequences_stop_independently_at_stop_tokens(checkpoints, models):
    _, hf_model = checkpoints["dense"]
    prompts = _prompts()
    free = [_hf_greedy(hf_model, p, NEW) for p in prompts]
    stop = free[0][4]  # prompt 0 stops at (the first occurrence of) its 5th token; the others may or may not
    result = generate(models["dense"], prompts, max_new_tokens=NEW, temperature=0.0, stop_token_ids=[stop, 127])
    for i, prompt in enumerate(prompts):
        expected = _hf_greedy(hf_model, prompt, NEW, eos_token_id=[stop, 127])
        assert result.sequences()[i] == expected, f"prompt {i}"
        hit = stop in free[i] or 127 in free[i]
        assert result.finish_reasons[i] == ("stop" if hit else "length")
        assert (result.tokens[i, len(expected) :] == 0).all() and (result.logprobs[i, len(expected) :] == 0).all()
    assert result.lengths[0] == free[0].index(stop) + 1 <= 5


def test_sampling_is_reproducible_from_the_seed(models):
    model, prompts = models["moe"], _prompts(2)
    kwargs = dict(max_new_tokens=NEW, temperature=1.0, top_p=0.95)
    first = generate(model, prompts, seed=3, **kwargs)
    again = generate(model, prompts, seed=3, **kwargs)
    other = generate(model, prompts, seed=4, **kwargs)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    np.testing.assert_array_equal(first.logprobs, again.logprobs)
    assert (first.tokens != other.tokens).mean() > 0.5
    alone = generate(model, prompts[:1], seed=3, **kwargs)  # a smaller batch bucket; same stream for prompt 0
    np.testing.assert_array_equal(alone.tokens[0], first.tokens[0])


def test_waves_equal_one_call(models):
    """``max_sequences`` 2 generates 5 sampled sequences (a stop id, different caps) in waves of 2, 2, 1: the tokens,
    lengths and finish reasons of one call, the log-probs to 1e-5."""
    model, prompts = models["moe"], _prompts(5) + _prompts(6)[:2]
    specs = [
        SamplingSpec(max_new_tokens=NEW - i, temperature=1.0, top_p=0.95, stop_token_ids=(5,), seed=7, stream=i)
        for i in range(5)
    ]
    whole = generate_rows(model, prompts, specs)
    waves = generate_rows(model, prompts, specs, max_sequences=2)
    np.testing.assert_array_equal(waves.tokens, whole.tokens)
    np.testing.assert_array_equal(waves.lengths, whole.lengths)
    assert waves.finish_reasons == whole.finish_reasons
    for name in ("logprobs", "policy_logprobs", "log_nucleus_mass"):
        np.testing.assert_allclose(getattr(waves, name), getattr(whole, name), atol=1e-5)
    with pytest.raises(ValueError, match="max_sequences must be >= 0"):
        generate_rows(model, prompts, specs, max_sequences=-1)


def test_chunked_prefill_and_buckets_reuse_compiled_functions(models):
    model = models["dense"]
    prompts = _prompts(3)
    whole = generate(model, prompts, max_new_tokens=NEW, temperature=0.0)
    chunked = generate(model, prompts, max_new_tokens=NEW, temperature=0.0, prefill_chunk=4)
    np.testing.assert_array_equal(chunked.tokens, whole.tokens)
    np.testing.assert_allclose(chunked.logprobs, whole.logprobs, atol=1e-5)
    compiled = (_prefill_chunk._cache_size(), _decode._cache_size())
    rng = np.random.default_rng(4)
    other = [rng.integers(0, 128, n).tolist() for n in (17, 2, 3, 20)]  # batch 4, prompt 20, 12 new: same buckets
    generate(model, other, max_new_tokens=NEW - 1, temperature=0.0)
    assert (_prefill_chunk._cache_size(), _decode._cache_size()) == compiled


def test_generation_on_a_mesh_matches_one_device(checkpoints, models):
    path, _ = checkpoints["moe"]
    mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
    sharded = qlx.load_hf(path, mesh=mesh)
    prompts = _prompts(5)
    kwargs = dict(max_new_tokens=NEW, temperature=0.8, top_p=0.9, seed=1)
    expected = generate(models["moe"], prompts, **kwargs)
    result = generate(sharded, prompts, **kwargs)
    np.testing.assert_array_equal(result.tokens, expected.tokens)
    np.testing.assert_allclose(result.logprobs, expected.logprobs, atol=1e-5)
    assert len(jax.tree.leaves(sharded)[0].sharding.device_set) == 8


def test_generation_on_a_length_split_cache_matches_one_device(checkpoints, models):
    """The cache's length split over seq=4 (long-context rollouts): chunked prefill and decode per length shard
    (``qlx.models.cache.write_and_attend``) give the one-device tokens and log-probs."""
    path, _ = checkpoints["moe"]
    sharded = qlx.load_hf(path, mesh=make_mesh({"data": 2, "seq": 4}))
    assert length_axes(sharded.layout, sharded.init_cache(4, 32).k[0].shape) == ("seq",)
    prompts = _prompts(6)
    kwargs = dict(max_new_tokens=NEW, temperature=0.8, top_p=0.9, seed=2, prefill_chunk=4)
    expected = generate(models["moe"], prompts, **kwargs)
    result = generate(sharded, prompts, **kwargs)
    np.testing.assert_array_equal(result.tokens, expected.tokens)
    np.testing.assert_allclose(result.logprobs, expected.logprobs, atol=1e-5)


def test_bad_inputs_name_the_problem(models):
    model = models["dense"]
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(model, [], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a non-empty"):
        generate(model, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompts\[0\]\[1\] = 128 is outside the vocabulary \[0, 128\)"):
        generate(model, [[1, 128]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(model, [[1]], max_new_tokens=2, top_p=1.5)
    with pytest.raises(ValueError, match=r"prompts\[0\] has 250 tokens; with max_new_tokens=7 it passes"):
        generate(model, [[1] * 250], max_new_tokens=7)
    with pytest.raises(ValueError, match="stop_token_ids: 999 is outside"):
        generate(model, [[1]], max_new_tokens=2, stop_token_ids=[999])
