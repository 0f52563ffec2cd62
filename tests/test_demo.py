"""`qlx demo --quick`: the main job end to end on a few questions (the full demo is `make demo`, not a test), then
`qlx demo --memory --quick` from it as its base."""

import json
import os
import signal

import numpy as np
import yaml

from qlx.cli import main
from qlx.data.demo_data import make_demo_dataset
from qlx.demo import evidence_only
from qlx.train.metrics import MetricsWriter, read_metrics
from qlx.train.trainer import SIGTERM_EXIT_CODE


def test_quick_demo_stops_on_sigterm_then_resumes_and_runs_every_stage(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    command = ["demo", "--quick", "--out", str(out), "--set", "model.num_layers=1"]
    write = MetricsWriter.write

    def write_then_sigterm(self, step, metrics):  # a real SIGTERM to this process, after the warm start's step 1
        write(self, step, metrics)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsWriter, "write", write_then_sigterm)
    assert main(command) == SIGTERM_EXIT_CODE
    assert "stopped by SIGTERM during the SFT warm start after step 1" in capsys.readouterr().err
    assert not (out / "rl").exists()  # neither evaluated nor trained on after the stopped stage
    monkeypatch.setattr(MetricsWriter, "write", write)

    assert main(command) == 0  # resumes the warm start at step 2
    printed = capsys.readouterr().out
    for task in ("mc", "multihop", "reading", "dialogue", "numerical", "all"):
        assert f"\n{task} " in printed
    assert "held-out accuracy beyond the 95% interval" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["before"]["all"]["n"] == results["after"]["all"]["n"] == 10
    assert isinstance(results["rl_lifts_accuracy"], bool)
    sft, rl = read_metrics(out / "sft"), read_metrics(out / "rl")
    assert [r["step"] for r in sft] == [1, 2, 3] and [r["step"] for r in rl] == [1, 2]
    assert {"reward/mean", "entropy", "aepo/negatives_on", "response_length/mean", "grad_norm"} <= set(rl[0])
    for name in ("reward.png", "entropy.png", "length.png"):
        assert (out / "rl" / "plots" / name).stat().st_size > 5000
    assert (out / "accuracy.png").stat().st_size > 5000
    assert json.loads((out / "rl" / "status.json").read_text())["status"] == "done"

    # the memory-agent demo (qlx demo --memory --quick) from this finished demo as its base
    memory = tmp_path / "memory"
    argv = ["demo", "--memory", "--quick", "--out", str(memory), "--base", str(out), "--set", "model.num_layers=1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"base model: the full-context demo in {out}" in printed
    for line in ("\nmultihop ", "\nreading ", "\nall ", "  1x (", "  2x (", "  4x (", "truncated to one window"):
        assert line in printed
    assert (memory / "data" / "tokenizer.json").read_bytes() == (out / "data" / "tokenizer.json").read_bytes()
    assert yaml.safe_load((memory / "sft" / "config.yaml").read_text())["train"]["init_from"] == str(out / "rl")
    results = json.loads((memory / "results.json").read_text())
    assert results["base"] == str(out) and results["before"]["all"]["n"] == results["after"]["all"]["n"] > 0
    assert set(results["by_length"]) == {k for k in results["by_length"] if k[:2] in ("1x", "2x", "4x")}
    assert len(results["by_length"]) == 3 and all(isinstance(v, bool) for v in results["targets"].values())
    assert "Trained length, by where the evidence ends" in printed
    by_position = results["by_evidence_position_1x"]
    assert set(by_position) == {"before RL", "after RL", "truncated to one window"}
    for name, overall in (("before RL", results["before"]["all"]), ("after RL", results["after"]["all"])):
        rows = by_position[name].values()  # the positions split the held-out questions: n and mean add up
        assert sum(r["n"] for r in rows) == overall["n"]
        assert np.isclose(sum(r["n"] * r["mean"] for r in rows) / overall["n"], overall["mean"])
    sft, rl = read_metrics(memory / "sft"), read_metrics(memory / "rl")
    assert [r["step"] for r in sft] == [1, 2] and [r["step"] for r in rl] == [1]
    assert {"memory/turns", "memory/conversations", "reward/mean"} <= set(rl[0]) and rl[0]["memory/turns"] >= 2
    assert (memory / "accuracy.png").stat().st_size > 5000
    held_out = [json.loads(x) for x in (memory / "data" / "eval_4x.jsonl").read_text().splitlines()]
    trained = [json.loads(x) for x in (memory / "data" / "train.jsonl").read_text().splitlines()]
    assert not {r["question"] for r in held_out} & {r["question"] for r in trained}
    assert np.mean([r["length_tokens"] for r in held_out]) > 2 * np.mean([r["length_tokens"] for r in trained])


def test_evidence_only_contexts_keep_every_fact_and_span():
    train, _, tokenizer = make_demo_dataset(seed=3, n_train=25, n_eval=5, max_context_tokens=384)
    for record in train:
        cut = evidence_only(record, tokenizer)
        assert len(cut.context) < len(record.context) and cut.length_tokens == len(tokenizer.encode(cut.context))
        before = {_fact_key(f): record.context[f["char_start"] : f["char_end"]] for f in record.evidence["facts"]}
        after = {_fact_key(f): cut.context[f["char_start"] : f["char_end"]] for f in cut.evidence["facts"]}
        assert after == before and all(f["object"] in after[_fact_key(f)] for f in cut.evidence["facts"])
        pieces = [cut.context[d["char_start"] : d["char_end"]] for d in cut.evidence["docs"]]
        assert cut.context == "".join(p + "\n\n" for p in pieces)
        assert all(p.strip() and p.strip() in record.context for p in pieces)
        assert cut.answer == record.answer and cut.question == record.question


def _fact_key(fact):
    return fact["subject"], fact["relation"], fact["object"], json.dumps(fact["qualifiers"], sort_keys=True)
