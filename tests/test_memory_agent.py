"""qlx.memory: config and template validation, token-space assembly against the text template and a plain concat,
the carry rule (plain, on device, and against the same rule on decoded text), and the compiled agent ``run`` against
its plain-loop oracle ``run_reference`` (greedy and sampled), compilations, and bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

from qlx.config import ConfigError, ModelConfig
from qlx.data.synth import default_tokenizer
from qlx.data.tokenizer import train_bpe_tokenizer
from qlx.memory import (
    TEMPLATES,
    MemoryAgentConfig,
    MemoryTemplate,
    TagPatterns,
    carried_memory,
    centre_truncate,
    run,
    run_reference,
    tokenize_template,
)
from qlx.memory import agent as agent_module
from qlx.memory.assemble import assemble_bs
from qlx.memory.carry import carried_memory_bm, carried_span
from qlx.memory.templates import assemble_ids, render_text
from qlx.models.qwen3 import build_model

TEXTS = [
    "Alice met Bob in Paris on Monday. The meeting was about the new bridge. " * 8,
    "<think>\nreasoning</think>\n\nUpdated memory:\n<memory>\nAlice, Paris\n</memory>\n<plan>\nfind Bob\n</plan>\n" * 4,
]
SMALL = MemoryTemplate(
    update="Q: {question}\nM: {memory}\nC: {chunk}\nU:", final="Q: {question} {instructions}\nM: {memory}\nA:"
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=320)


@pytest.fixture(scope="module")
def demo_tokenizer():
    return default_tokenizer(0)


@pytest.fixture(scope="module")
def model(tokenizer):
    config = ModelConfig(
        family="qwen3",
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        intermediate_size=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    return build_model(config, seed=0)


def _config(**overrides):
    base = dict(
        template=SMALL,
        chat_mode=None,
        chunk_tokens=32,
        memory_tokens=10,
        max_memory_tokens=12,
        final_tokens=6,
        max_question_tokens=16,
        max_instruction_tokens=16,
        window_chunks=4,
        prefill_chunk=64,
        temperature=0.0,
    )
    return MemoryAgentConfig(**{**base, **overrides})


def _documents(vocab, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


QUESTIONS = ["Where did Alice meet Bob?", ("Who built the bridge?", "One word.")]


# --- config and templates ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [
        ("chunk_tokens", 0),
        ("memory_tokens", -1),
        ("max_memory_tokens", 0),
        ("max_chunks", 0),
        ("template", "nope"),
        ("chat_mode", "chatty"),
        ("carry", "everything"),
        ("temperature", -0.5),
        ("top_p", 0.0),
        ("top_k", -1),
        ("stop_token_ids", ()),
        ("window_chunks", 0),
    ],
)
def test_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError) as error:
        MemoryAgentConfig(**{key: value})
    assert error.value.key == key


def test_config_defaults_are_the_recipe_sizes():
    config = MemoryAgentConfig()
    assert (config.chunk_tokens, config.memory_tokens, config.max_memory_tokens) == (32768, 15360, 15360)
    assert config.memory_template is TEMPLATES["qwenlong"]


@pytest.mark.parametrize(
    "update, final, message",
    [
        ("{question} {memory}", "{question} {memory}", "{chunk}"),
        ("{question} {memory} {chunk} {chunk}", "{question} {memory}", "{chunk}"),
        ("{question} {memory} {chunk}", "{question}", "{memory}"),
        ("{question} {memory} {chunk}", "{question} {memory} {chunk}", "{chunk}"),
        ("{question} {memory} {chunk} {instructions}", "{question} {memory}", "{instructions}"),
    ],
)
def test_template_without_its_slots_is_an_error(update, final, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        MemoryTemplate(update=update, final=final)


def test_literal_braces_are_text():
    """MemAgent's final prompt has a literal \\boxed{} (its sync loop shows a doubled-brace artefact; not here)."""
    turn = tokenize_template(train_bpe_tokenizer(["a b"], vocab_size=260), TEMPLATES["memagent"], None).final
    assert "\\boxed{}" in "".join(turn.texts) and "{{" not in "".join(turn.texts)


# --- token-space assembly ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("chat_mode", ["thinking", None])
@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_assembled_ids_decode_to_the_text_template(name, chat_mode, which, tokenizer, demo_tokenizer):
    tok = demo_tokenizer if which == "demo" else tokenizer
    template = tokenize_template(tok, TEMPLATES[name], chat_mode)
    document_ids = tok.encode("The meeting was in Paris, on Monday; Bob came late.\nThe bridge opened in 1999.")
    values_ids = {
        "question": tok.encode("Where did Alice meet Bob?"),
        "memory": tok.encode("<memory>\nAlice met Bob.\n</memory>\n<plan>\nthe date\n</plan>"),
        "chunk": document_ids[3:17],  # a chunk cut at arbitrary token boundaries
        "instructions": tok.encode("Answer in one word."),
    }
    for turn in (template.update, template.final):
        ids = assemble_ids(turn, values_ids)
        text = render_text(turn, {k: tok.decode(v) for k, v in values_ids.items()})
        assert tok.decode(ids) == text
        assert text.count(tok.decode(values_ids["question"])) >= 1
    assert tok.decode(template.no_memory) == TEMPLATES[name].no_memory


def test_device_assembly_equals_the_plain_concatenation(tokenizer):
    turn = tokenize_template(tokenizer, TEMPLATES["qwenlong"], "thinking").update
    rng = np.random.default_rng(0)
    widths = {"question": 7, "memory": 9, "chunk": 11}
    lengths = {k: np.array([0, 3, w, 1]) for k, w in widths.items()}
    ids = {k: rng.integers(1, 300, (4, w)) for k, w in widths.items()}
    width = turn.literal_tokens + sum(widths.values()) + 5
    tokens_bs, length_b = assemble_bs(turn, {k: (jnp.asarray(ids[k]), jnp.asarray(lengths[k])) for k in widths}, width)
    for b in range(4):
        expected = assemble_ids(turn, {k: ids[k][b, : lengths[k][b]].tolist() for k in widths})
        assert int(length_b[b]) == len(expected)
        assert np.asarray(tokens_bs[b]).tolist() == expected + [0] * (width - len(expected))


# --- the carry rule ---------------------------------------------------------------------------------------------

THINK, OPEN, CLOSE, PLAN_CLOSE = 900, 901, 902, 903
HAND_TAGS = TagPatterns(think_end=((THINK,),), memory_open=((OPEN,),), plan_close=((PLAN_CLOSE,), (7, PLAN_CLOSE)))


@pytest.mark.parametrize(
    "ids, rule, span",
    [
        ([1, THINK, 2, OPEN, 3, CLOSE, 4, PLAN_CLOSE, 5], "blocks", (3, 8)),  # the blocks after </think>
        ([OPEN, 1, THINK, 2, OPEN, 3, 7, PLAN_CLOSE], "blocks", (4, 8)),  # last </think>; two-token spelling
        ([1, THINK, 2, THINK, 3, 4], "blocks", (4, 6)),  # no <memory>: the text after the last </think>
        ([1, 2, OPEN, 3, 4], "blocks", (2, 5)),  # <memory> never closes: its raw tail
        ([1, 2, 3], "blocks", (0, 3)),  # no tags at all (a turn cut off while thinking): everything
        ([1, THINK, 2, OPEN, 3], "after_think", (2, 5)),
        ([1, THINK, 2, OPEN, 3], "response", (0, 5)),
        ([OPEN, 1, THINK, 2], "blocks", (3, 4)),  # a <memory> inside the thinking does not count
    ],
)
def test_carried_span_hand_cases(ids, rule, span):
    assert carried_span(ids, HAND_TAGS, rule) == span


def test_carried_memory_caps_and_falls_back():
    assert carried_memory([1, THINK, OPEN, 2, 3, 4, 5], HAND_TAGS, "blocks", 3, (42,)) == [OPEN, 2, 3]
    assert carried_memory([1, THINK], HAND_TAGS, "blocks", 3, (42, 43)) == [42, 43]  # empty -> no_memory


@pytest.mark.parametrize("rule", ["blocks", "after_think", "response"])
def test_device_carry_equals_the_plain_rule(rule):
    rng = np.random.default_rng(1)
    vocab = [1, 2, 7, THINK, OPEN, CLOSE, PLAN_CLOSE]
    rows = [rng.choice(vocab, 14).tolist() for _ in range(64)]
    n = rng.integers(0, 15, 64)
    ids_bm, len_b = carried_memory_bm(jnp.asarray(rows), jnp.asarray(n), HAND_TAGS, rule, 5, 6, (42, 43))
    for b, row in enumerate(rows):
        expected = carried_memory(row[: n[b]], HAND_TAGS, rule, 5, (42, 43))
        assert np.asarray(ids_bm[b, : len_b[b]]).tolist() == expected


def _text_rule(text: str) -> str:
    """The 'blocks' rule on decoded text: the reference a text-templating agent would use."""
    after = text.rsplit("</think>", 1)[1] if "</think>" in text else text
    start = after.find("<memory>")
    if start < 0:
        return after
    end = after.find("</plan>", start)
    return after[start:] if end < 0 else after[start : end + len("</plan>")]


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_token_rule_matches_the_text_rule(which, tokenizer, demo_tokenizer):
    tok = demo_tokenizer if which == "demo" else tokenizer
    tags = TagPatterns.build(tok)
    texts = [
        "<think>\nhm</think>\n\nUpdated memory:\n<memory>\nAlice met Bob.\n</memory>\n<plan>\nthe date\n</plan>",
        "Updated memory: <memory>Alice, Paris</memory> <plan>Bob</plan> trailing words",
        "<think>a</think>b</think>\n<memory>\nkept\n</memory>\n<plan>\nnext\n</plan>\n\nmore",
        "<think>\nno memory block here</think>\nAlice met Bob in Paris.",
        "<think>\nthinking that never ends with a <memory> inside",
        "Updated memory:\n<memory>\nAlice met Bob, and the memory never closes",
    ]
    for text in texts:
        ids = tok.encode(text)
        start, end = carried_span(ids, tags, "blocks")
        assert tok.decode(ids[start:end]).strip() == _text_rule(text).strip(), text


# --- the compiled agent against its oracle ----------------------------------------------------------------------


def _assert_same(a, b):
    for field in ("prompt_ids", "prompt_lengths", "response_ids", "response_lengths", "valid", "stopped", "final"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
    assert a.memories == b.memories and a.answers == b.answers


def test_run_equals_the_reference_greedy_and_counts_compilations(model, tokenizer):
    config = _config()
    documents = _documents(tokenizer.vocab_size, (100, 40))  # 4 and 2 chunks: rows go inactive mid-window
    compiled = agent_module._read_window._cache_size()
    out = run(model, tokenizer, QUESTIONS, documents, config, samples_per_question=2)
    ref = run_reference(model, tokenizer, QUESTIONS, documents, config, samples_per_question=2)
    _assert_same(out, ref)
    assert out.valid.shape == (5, 4) and out.num_chunks.tolist() == [4, 4, 2, 2]
    assert out.valid[:, 2].tolist() == [True, True, False, False, True] and out.final[4].all()
    assert (out.trajectory == np.arange(4)).all() and out.question_index.tolist() == [0, 0, 1, 1]
    # greedy: both samples of a question are the same trajectory
    np.testing.assert_array_equal(out.response_ids[:, 0], out.response_ids[:, 1])
    # the chunk ids sit in the prompt exactly: turn 1 of row 2 holds document 1's tokens 32..40
    assert out.prompt_ids[1, 2, : out.prompt_lengths[1, 2]].tolist().count(documents[1][32]) >= 1
    # a 16-chunk document (4 windows) runs the same executable as the 4-chunk one
    long = _documents(tokenizer.vocab_size, (16 * 32, 3 * 32), seed=1)
    longer = run(model, tokenizer, QUESTIONS, long, config, samples_per_question=2)
    assert longer.num_chunks.tolist() == [16, 16, 3, 3] and longer.valid.shape == (17, 4)
    assert agent_module._read_window._cache_size() == compiled + 1


def test_run_equals_the_reference_sampled(model, tokenizer):
    """Sampled turns draw from the stream (seed, turn, trajectory): the reference batches only the active rows per
    turn, so equality also shows that a trajectory's samples do not depend on the other rows."""
    config = _config(temperature=1.0, top_p=0.9)
    documents = _documents(tokenizer.vocab_size, (70, 33), seed=2)
    out = run(model, tokenizer, QUESTIONS, documents, config, samples_per_question=2, seed=5)
    ref = run_reference(model, tokenizer, QUESTIONS, documents, config, samples_per_question=2, seed=5)
    _assert_same(out, ref)
    assert not np.array_equal(out.response_ids[:, 0], out.response_ids[:, 1])  # samples differ
    other = run(model, tokenizer, QUESTIONS, documents, config, samples_per_question=2, seed=6)
    assert not np.array_equal(out.response_ids, other.response_ids)
    # log-probs are those of the sampling distribution of exactly these ids (finite, <= 0 on the mask)
    mask = out.response_mask
    assert np.all(out.logprobs[mask] <= 0) and np.all(out.logprobs[~mask] == 0)


# --- bad input --------------------------------------------------------------------------------------------------


def test_empty_document_is_an_error(model, tokenizer):
    with pytest.raises(ValueError, match=r"documents\[1\] is empty"):
        run(model, tokenizer, QUESTIONS, [[1, 2, 3], []], _config())


def test_a_document_shorter_than_one_chunk_is_one_turn(model, tokenizer):
    documents = _documents(tokenizer.vocab_size, (5, 100))
    out = run(model, tokenizer, QUESTIONS, documents, _config(), samples_per_question=2)
    assert out.num_chunks.tolist() == [1, 1, 4, 4] and out.valid[:, 0].tolist() == [True, False, False, False, True]
    prompt = out.prompt_ids[0, 0, : out.prompt_lengths[0, 0]].tolist()
    turn = tokenize_template(tokenizer, SMALL, None).update
    memory = list(tokenize_template(tokenizer, SMALL, None).no_memory)
    assert prompt == assemble_ids(
        turn, {"question": tokenizer.encode(QUESTIONS[0]), "memory": memory, "chunk": documents[0]}
    )


def test_question_too_long_and_window_too_small_are_errors(model, tokenizer):
    documents = _documents(tokenizer.vocab_size, (40, 40))
    with pytest.raises(ValueError, match=r"questions\[0\] has \d+ tokens, more than max_question_tokens"):
        run(model, tokenizer, ["Alice " * 40, "b"], documents, _config())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        run(model, tokenizer, QUESTIONS, documents, _config(chunk_tokens=2000))
    with pytest.raises(ValueError, match=r"questions\[0\] has instructions but the final template has no"):
        run(model, tokenizer, [("q", "inst")], documents[:1], _config(template="memagent"))
    with pytest.raises(ValueError, match="2 questions but 1 documents"):
        run(model, tokenizer, QUESTIONS, documents[:1], _config())
    with pytest.raises(ValueError, match=r"documents\[0\]\[0\] = 100000 is outside the vocabulary"):
        run(model, tokenizer, QUESTIONS[:1], [[100000]], _config())


def test_centre_truncation_keeps_both_ends():
    ids = np.arange(11)
    assert centre_truncate(ids, 5).tolist() == [0, 1, 8, 9, 10]
    assert centre_truncate(ids, None).tolist() == ids.tolist() and centre_truncate(ids, 20).tolist() == ids.tolist()
