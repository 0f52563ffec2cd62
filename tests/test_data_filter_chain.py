"""Filters wired into synthesis: a deterministic fake model gives exact per-filter counts, rejects carry reasons,
shards filter exactly as one run, difficulty balancing after shards equals the single run's, and the CLI
decontaminates against a test-set file."""

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from qlx.cli import main as cli_main
from qlx.data.filter_chain import FilterConfig
from qlx.data.records import read_context, read_jsonl
from qlx.data.synth import SynthConfig, default_tokenizer, synthesize
from qlx.data.synth_cli import rule_is_correct

K = 4
BASE = dict(n=15, min_tokens=512, max_tokens=2000, seed=12, inline_max_tokens=1200)


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(0)


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tok):
    """The unfiltered run: what every filtered run starts from."""
    out = tmp_path_factory.mktemp("plain")
    synthesize(SynthConfig(**BASE), out, tokenizer=tok, progress=False)
    records = list(read_jsonl(out / "records.jsonl"))
    return out, records, {r.question: read_context(r, out) for r in records}


def _h(question: str) -> int:
    return int(hashlib.sha256(question.encode()).hexdigest(), 16)


def _expected(question: str) -> tuple[int, int, int]:
    """(closed-book, with extra distractors, with the context): correct responses out of K."""
    h = _h(question)
    return (K if h % 5 == 0 else 0), (0 if (h // 5) % 4 == 1 else 1), (h // 20) % (K + 1)


def _fake_model(records, contexts):
    """Knows each gold answer; how many of K responses are right depends on the question's hash and on which check
    asks: closed book (no <text>), extra distractors (more documents than the record's context), or the context."""
    by_question = {r.question: r for r in records}

    def right(record):
        if record.task_type == "dialogue":
            return record.answer
        return (
            f"The correct answer is ({record.answer})"
            if record.options
            else f"Therefore, the answer is {record.answer}"
        )

    def answer_fn(prompts, k):
        assert k == K
        out = []
        for (message,) in prompts:
            text = message["content"]
            if "<text>\n" in text:
                context, rest = text.split("<text>\n", 1)[1].split("</text>\n\n", 1)
            else:
                context, rest = None, text
            question = max((q for q in by_question if rest.startswith(q + "\n\n")), key=len)
            closed, robust, full = _expected(question)
            if context is None:
                n_right = closed
            else:
                record, original = by_question[question], contexts[question]
                grown = context != original
                if grown:
                    assert len(context) > len(original) and context.endswith("\n\n")
                    for doc in record.evidence["docs"]:
                        assert original[doc["char_start"] : doc["char_end"]] in context, "evidence stays whole"
                n_right = robust if grown else full
            out.append([right(by_question[question])] * n_right + ["I cannot tell."] * (k - n_right))
        return out

    return answer_fn


def _filters(**overrides):
    return FilterConfig(model=("grounding", "robustness", "difficulty"), k=K, robustness_docs=3, batch=4, **overrides)


def test_fake_model_gives_exact_filter_counts_and_rejects(plain, tok, tmp_path):
    out, records, contexts = plain
    config = SynthConfig(**BASE, filters=_filters(keep_pass_rate=(0.25, 1.0), bins=2))
    card = synthesize(
        config, tmp_path, tokenizer=tok, answer_fn=_fake_model(records, contexts), is_correct=rule_is_correct,
        progress=False,
    )  # fmt: skip
    expected, survivors = Counter(), []
    for r in records:
        closed, robust, full = _expected(r.question)
        stage = "grounding" if closed else "robustness" if not robust else "difficulty" if full < 1 else None
        if stage:
            expected[stage] += 1
        else:
            survivors.append((r.id, full))
    assert min(expected.values()) >= 1 and survivors, f"fixture should exercise every filter: {expected}"
    n_in = len(records)
    for name in ("grounding", "robustness", "difficulty"):
        assert card["filters"][name] == {"in": n_in, "kept": n_in - expected[name], "dropped": expected[name]}
        n_in -= expected[name]
    kept = list(read_jsonl(tmp_path / "records.jsonl"))
    assert [(r.id, r.source["checks"]["difficulty"]["correct"]) for r in kept] == survivors
    assert all(r.source["checks"]["robustness"]["correct"] == 1 for r in kept)
    originals = {r.id: r for r in records}
    for r in kept:
        assert r.question == originals[r.id].question and r.context == originals[r.id].context
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert Counter(j["filter"] for j in rejects) == expected
    assert {j["record"]["id"] for j in rejects} | {r.id for r in kept} == set(originals)
    reasons = {j["filter"]: j["reason"] for j in rejects}
    assert reasons["grounding"] == f"answered correctly without the context in {K} of {K} tries"
    assert reasons["robustness"] == f"pass@{K} is 0 with 3 extra distractor documents"
    assert reasons["difficulty"] == "pass rate 0 with the context is outside [0.25, 1.0]"
    assert "| grounding |" in (tmp_path / "card.md").read_text()

    balanced = list(read_jsonl(tmp_path / "balanced.jsonl"))
    bins = Counter(min(int(r.source["checks"]["difficulty"]["correct"] / K * 2), 1) for r in balanced)
    all_bins = Counter(min(int(full / K * 2), 1) for _, full in survivors)
    assert set(bins) == set(all_bins) and set(bins.values()) == {min(all_bins.values())}
    not_drawn = (tmp_path / "balanced_rejects.jsonl").read_text().splitlines()
    assert len(balanced) + len(not_drawn) == len(kept)


def test_filtered_shards_equal_the_single_run_and_balance_after(plain, tok, tmp_path, capsys):
    out, records, contexts = plain
    answer_fn = _fake_model(records, contexts)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    config = SynthConfig(**BASE, filters=_filters())
    synthesize(config, single, tokenizer=tok, answer_fn=answer_fn, is_correct=rule_is_correct, progress=False)
    for i in range(2):
        config = SynthConfig(**BASE, shard_index=i, shard_count=2, filters=_filters())
        synthesize(config, sharded, tokenizer=tok, answer_fn=answer_fn, is_correct=rule_is_correct, progress=False)
    assert not (sharded / "balanced.jsonl").exists(), "a shard cannot balance alone"

    def lines(directory: Path, pattern: str) -> list[str]:
        return sorted(line for f in directory.glob(pattern) for line in f.read_text().splitlines())

    assert lines(sharded, "records-*.jsonl") == lines(single, "records.jsonl")
    assert lines(sharded, "rejects-*.jsonl") == lines(single, "rejects.jsonl")
    assert cli_main(["synth", "--card", str(sharded)]) == 0
    merged = json.loads((sharded / "card.json").read_text())
    assert merged["filters"] == json.loads((single / "card.json").read_text())["filters"]
    assert cli_main(["synth", "--balance", str(sharded), "--seed", "12"]) == 0
    assert "balanced.jsonl" in capsys.readouterr().out
    assert (sharded / "balanced.jsonl").read_text() == (single / "balanced.jsonl").read_text()
    assert cli_main(["synth", "--balance", str(out)]) == 2
    assert "no difficulty check" in capsys.readouterr().err


def test_cli_decontaminates_against_a_test_set(plain, tok, tmp_path, capsys):
    out, records, _ = plain
    tok.save(tmp_path / "tok")
    leaked = records[2:5]
    test_set = tmp_path / "test.jsonl"
    test_set.write_text("".join(json.dumps({"question": r.question, "answer": r.answer}) + "\n" for r in leaked))
    args = ["synth", "--n", "15", "--min-tokens", "512", "--max-tokens", "2000", "--seed", "12", "--quiet"]
    args += ["--inline-max-tokens", "1200", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "run")]
    assert cli_main([*args, "--decontaminate", str(test_set)]) == 0
    assert "| decontaminate | 15 | 12 | 3 |" in capsys.readouterr().out
    kept = list(read_jsonl(tmp_path / "run" / "records.jsonl"))
    assert [r.id for r in kept] == [r.id for r in records if r not in leaked]
    rejects = [json.loads(line) for line in (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()]
    assert [j["record"]["id"] for j in rejects] == [r.id for r in leaked]
    assert all(j["filter"] == "decontaminate" for j in rejects)
    assert all(j["reason"].startswith("100% of its 8-grams") for j in rejects if j["record"]["options"] is None)
    assert all(re.match(r"\d+% of its 8-grams are in", j["reason"]) for j in rejects)
    assert cli_main([*args, "--decontaminate", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert cli_main([*args, "--filters", "grounding,magic"]) == 2
    assert "magic" in capsys.readouterr().err
    assert cli_main([*args, "--filters", "grounding", "--keep-pass-rate", "0.5"]) == 2
    assert "--keep-pass-rate" in capsys.readouterr().err


def test_filter_client_from_flags_then_filter_env_then_llm_env():
    from argparse import Namespace

    from qlx.data.synth_cli import filter_client

    env = {"QLX_LLM_URL": "http://llm:1/v1", "QLX_LLM_MODEL": "m1", "QLX_LLM_API_KEY": "k1"}
    config = filter_client(Namespace(filter_url=None, filter_model=None), env).config
    assert (config.base_url, config.model, config.api_key) == ("http://llm:1/v1", "m1", "k1")
    env |= {"QLX_FILTER_URL": "http://filter:2/v1", "QLX_FILTER_MODEL": "m2", "QLX_FILTER_API_KEY": "k2"}
    config = filter_client(Namespace(filter_url=None, filter_model=None), env).config
    assert (config.base_url, config.model, config.api_key) == ("http://filter:2/v1", "m2", "k2")
    config = filter_client(Namespace(filter_url="https://flag:3/v1", filter_model="m3"), env).config
    assert (config.base_url, config.model, config.api_key) == ("https://flag:3/v1", "m3", "k2")
    with pytest.raises(ValueError, match="--filter-url and --filter-model"):
        filter_client(Namespace(filter_url="http://x:1/v1", filter_model=None), {})
