"""`qlx demo --quick`: the main job end to end on a few questions (the full demo is `make demo`, not a test)."""

import json

from qlx.cli import main
from qlx.data.demo_data import make_demo_dataset
from qlx.demo import evidence_only
from qlx.train.metrics import read_metrics


def test_quick_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--set", "model.num_layers=1"]) == 0
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
