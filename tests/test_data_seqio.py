"""The optional seqio adapter (extra qlx[seqio]); skipped unless seqio is installed."""

import pytest

seqio = pytest.importorskip("seqio")

from qlx.data.prompts import user_prompt  # noqa: E402
from qlx.data.records import read_jsonl  # noqa: E402
from qlx.data.seqio_adapter import register_seqio_task  # noqa: E402
from qlx.data.synth import SynthConfig, default_tokenizer, synthesize  # noqa: E402


def test_records_become_a_seqio_task(tmp_path):
    synthesize(SynthConfig(engine="kg", n=4, min_tokens=512, max_tokens=1024), tmp_path, tokenizer=default_tokenizer(0))
    records = list(read_jsonl(tmp_path / "records.jsonl"))
    task = register_seqio_task(
        "qlx_test_records", {"train": [tmp_path / "records.jsonl"]}, seqio.PassThroughVocabulary(size=256)
    )
    examples = list(task.source.get_dataset("train").as_numpy_iterator())
    assert [e["id"].decode() for e in examples] == [r.id for r in records]
    assert examples[0]["inputs"].decode() == user_prompt(records[0].question, records[0].context, records[0].options)
    assert examples[0]["targets"].decode() == records[0].answer
