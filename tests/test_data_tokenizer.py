"""Tokenizer loading and the Qwen chat template, checked against transformers' jinja rendering of Qwen3 templates."""

import io
import random

import pytest

from qlx.data.tokenizer import load_tokenizer, render_chat, train_bpe_tokenizer

# The structure of Qwen3's chat template (tools left out): reasoning kept only after the last user query.
_QWEN3_BODY = r"""
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n')
                                                   .split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n')
                    + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
"""
QWEN3_HYBRID_TEMPLATE = (
    _QWEN3_BODY
    + r"""
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""
)
QWEN3_THINKING_2507_TEMPLATE = (
    _QWEN3_BODY
    + r"""
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n<think>\n' }}
{%- endif %}"""
)


def _texts(seed, n=300):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnoprstuvwyz") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + f". Revenue was {rng.randint(1, 99999)}.\n"
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(_texts(0), vocab_size=800)


def _conversations(seed):
    rng = random.Random(seed)
    texts = _texts(seed + 1, 40)

    def t():
        return rng.choice(texts).strip()

    return [
        [{"role": "user", "content": t()}],
        [{"role": "system", "content": t()}, {"role": "user", "content": t()}],
        [
            {"role": "system", "content": t()},
            {"role": "user", "content": t()},
            {"role": "assistant", "content": f"<think>\n{t()}\n</think>\n\n{t()}"},
            {"role": "user", "content": t()},
            {"role": "assistant", "content": t(), "reasoning_content": t()},
        ],
        [
            {"role": "user", "content": t()},
            {"role": "assistant", "content": t(), "reasoning_content": t()},
            {"role": "assistant", "content": f"{t()}</think>{t()}"},
        ],
        [{"role": "user", "content": t()}, {"role": "assistant", "content": t()}, {"role": "system", "content": t()}],
    ]


@pytest.mark.parametrize("seed", [3, 11])
def test_chat_template_matches_transformers_qwen3_templates(tok, tmp_path, seed):
    from transformers import PreTrainedTokenizerFast

    hybrid = PreTrainedTokenizerFast(tokenizer_object=tok.backend, chat_template=QWEN3_HYBRID_TEMPLATE)
    thinking = PreTrainedTokenizerFast(tokenizer_object=tok.backend, chat_template=QWEN3_THINKING_2507_TEMPLATE)
    for messages in _conversations(seed):
        for gen in (False, True):
            cases = [
                ("thinking", thinking, {}),
                ("instruct", hybrid, {}),
                ("no_think", hybrid, {"enable_thinking": False}),
            ]
            for mode, reference, extra in cases:
                want = reference.apply_chat_template(
                    messages, add_generation_prompt=gen, tokenize=True, return_dict=False, **extra
                )
                got = tok.apply_chat_template(messages, add_generation_prompt=gen, mode=mode)
                assert got == list(want), (mode, gen, messages)
    assert render_chat([{"role": "user", "content": "q"}], add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n<think>\n"
    )


def test_special_tokens_are_single_ids_and_roundtrip(tok, tmp_path):
    ids = tok.encode("<|im_start|>user\nhello<|im_end|>\n<think>\nx</think>")
    assert ids[0] == tok.im_start_id and tok.im_end_id in ids and tok.think_id in ids and tok.think_end_id in ids
    assert len({tok.im_start_id, tok.im_end_id, tok.pad_id, tok.think_id, tok.think_end_id}) == 5
    for text in _texts(5, 20):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(_texts(6, 5)) == [tok.encode(t) for t in _texts(6, 5)]
    loaded = load_tokenizer(tok.save(tmp_path / "tk").parent)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode("Revenue was 123 <|im_end|>") == tok.encode("Revenue was 123 <|im_end|>")
    with pytest.raises(KeyError, match="<nope>"):
        tok.special_id("<nope>")


def test_sentencepiece_model_behind_same_interface(tmp_path):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_texts(1, 400)),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    sp_tok = load_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "hello world"}]
    ids = sp_tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ids[0] == sp_tok.im_start_id and ids[-2] == sp_tok.think_id
    assert sp_tok.decode(ids) == render_chat(messages, add_generation_prompt=True)
    assert "<|im_start|>" not in sp_tok.decode(ids, skip_special_tokens=True)
    assert sp_tok.token_to_id("<never-seen>") is None
    again = load_tokenizer(sp_tok.save(tmp_path / "copy"))
    assert again.encode("some text <|im_end|>") == sp_tok.encode("some text <|im_end|>")


def test_bad_inputs_name_the_problem(tok, tmp_path):
    with pytest.raises(ValueError, match=r"messages\[1\].role"):
        render_chat([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(ValueError, match="chat mode"):
        render_chat([{"role": "user", "content": "a"}], mode="fast")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(("name", "data"), [("tokenizer.json", b'{"bad": 1'), ("tokenizer.json", b"\xff\xfe"),
                                            ("sp.model", b"garbage")])  # fmt: skip
def test_corrupt_tokenizer_files_raise_value_error_naming_the_file(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    for path in (tmp_path, tmp_path / name):
        with pytest.raises(ValueError, match=rf"{tmp_path / name}: not a valid tokenizer file"):
            load_tokenizer(path)
