"""Context assembly: length to target (checked by tokenizing the result), evidence positions, streaming."""

import io

import numpy as np
import pytest

from qlx.data.assemble import ContextTooSmall, InlinePiece, assemble_context
from qlx.data.docstore import DocStore
from qlx.data.render import render_world
from qlx.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from qlx.data.world import generate_world


@pytest.fixture(scope="module")
def docs():
    return list(render_world(generate_world(9, 60)))


@pytest.fixture(scope="module")
def bpe_store(docs, tmp_path_factory):
    tok = train_bpe_tokenizer((d.text for d in docs[:200]), vocab_size=1500)
    store = DocStore(tmp_path_factory.mktemp("s") / "docs.bin", tok)
    store.add((d.doc_id, d.text, d.mentions) for d in docs)
    return store.close()


class _RecordingSink(io.BytesIO):
    def __init__(self):
        super().__init__()
        self.largest_write = 0

    def write(self, data):
        self.largest_write = max(self.largest_write, len(data))
        return super().write(data)


@pytest.mark.parametrize("target", [1024, 4000, 32_000, 150_000])
def test_length_matches_target_and_real_tokenization(bpe_store, docs, target):
    rng = np.random.default_rng(target)
    evidence = [docs[int(i)].doc_id for i in rng.choice(len(docs), 3, replace=False)]
    needle = InlinePiece("needle", "User: the code is 4711.\nAssistant: Noted.")
    sink = _RecordingSink()
    assembly = assemble_context(bpe_store, [*evidence, needle], target, rng, sink)
    text = sink.getvalue().decode("utf-8")
    real = len(bpe_store.tokenizer.encode(text))
    assert assembly.length_tokens == real
    assert abs(real - target) <= 0.02 * target
    assert assembly.length_chars == len(text)
    assert [p.doc_id for p in assembly.placements] == [*evidence, "needle"], "evidence keeps its order"
    for p in assembly.placements[:3]:
        assert text[p.char_start : p.char_end] == bpe_store.text(bpe_store.index(p.doc_id))
        assert len(bpe_store.tokenizer.encode(text[: p.char_start])) == p.token_start
    assert text[assembly.placements[3].char_start : assembly.placements[3].char_end] == needle.text
    assert sink.largest_write <= int(bpe_store.byte_lengths.max()), "pieces are streamed one document at a time"


def test_confusers_first_and_too_small_targets(bpe_store, docs):
    rng = np.random.default_rng(0)
    confusers = [d.doc_id for d in docs[100:110]]
    sink = io.BytesIO()
    assemble_context(bpe_store, [docs[0].doc_id], 3000, rng, sink, confusers=confusers)
    text = sink.getvalue().decode("utf-8")
    assert all(bpe_store.text(bpe_store.index(c)) in text for c in confusers)
    with pytest.raises(ContextTooSmall, match="more than the target"):
        assemble_context(bpe_store, [docs[0].doc_id, docs[1].doc_id], 20, rng, io.BytesIO())
    with pytest.raises(ValueError, match="too small"):
        assemble_context(bpe_store, [docs[0].doc_id], bpe_store.total_tokens * 2, rng, io.BytesIO())


def test_sentencepiece_lengths_within_two_percent(docs, tmp_path):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([d.text for d in docs[:300]]),
        model_writer=model,
        vocab_size=800,
        model_type="unigram",
        minloglevel=2,
    )
    (tmp_path / "sp.model").write_bytes(model.getvalue())
    tok = load_tokenizer(tmp_path / "sp.model")
    store = DocStore(tmp_path / "docs.bin", tok)
    store.add((d.doc_id, d.text, d.mentions) for d in docs[:400])
    store.close()
    rng = np.random.default_rng(1)
    for target in (1000, 20_000):
        sink = io.BytesIO()
        assemble_context(store, [docs[5].doc_id], target, rng, sink)
        real = len(tok.encode(sink.getvalue().decode("utf-8")))
        assert abs(real - target) <= 0.02 * target, (real, target)
