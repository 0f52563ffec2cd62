"""`qlx eval` end to end: the six benchmarks against `qlx serve` (a tiny random model) with a stub judge, resume
(nothing regenerated, judge replies cached), --rescore, --compare, a resume after SIGKILL, and the --ckpt backend."""

import dataclasses
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import qlx
import qlx.eval as E
from qlx.cli import main as cli_main
from qlx.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from qlx.eval.runner import request_seed
from qlx.memory import MemoryAgentConfig, run_reference
from qlx.models import build_model
from qlx.rollout import serve_in_thread

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WORDS = ["alpha", "beta", "gamma", "delta", "harbour", "crane", "river", "silo", "poem", "tapir", "grain", "north"]


def _text(n, seed):
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n))


def _write_data(root):
    lb2 = []
    for i in range(3):
        choices = {f"choice_{x}": f"{x.lower()} option" for x in "ABCD"}
        lb2.append(
            {
                "_id": f"lb{i}",
                "domain": "Single-Document QA",
                "sub_domain": "x",
                "difficulty": ("easy", "hard")[i % 2],
                "length": ("short", "medium", "long")[i],
                "question": f"Which option {i}?",
                **choices,
                "answer": "ABCD"[i],
                "context": _text((20, 40, 300)[i], i),  # the longest ones are over the 300-token budget
            }
        )
    (root / "longbench_v2").mkdir()
    (root / "longbench_v2" / "data.json").write_text(json.dumps(lb2, indent=1))
    conv = [{"role": "user", "content": "write a poem about tapirs"}, {"role": "assistant", "content": _text(30, 1)}]
    conv += [{"role": "user", "content": "Prepend Zq81 to the 1st poem about tapirs."}]
    mrcr = {"prompt": json.dumps(conv), "answer": "Zq81" + _text(30, 1), "random_string_to_prepend": "Zq81"}
    (root / "mrcr").mkdir()
    (root / "mrcr" / "2needle.jsonl").write_text(json.dumps({**mrcr, "n_needles": 2}) + "\n")
    doc = {"question_id": "d1", "question": "Q-yes growth?", "paragraphs": [_text(40, 2)], "ground_truth": 12.5}
    (root / "docmath").mkdir()
    (root / "docmath" / "simpshort_testmini.json").write_text(
        json.dumps([doc, {**doc, "question_id": "d2", "question": "Q?"}])
    )
    frames = [
        {"Unnamed: 0": i, "Prompt": q, "Answer": "Paris", "wiki_items": [{"title": "Paris", "text": _text(40, i)}]}
        for i, q in enumerate(["Q-yes capital?", "Q capital?"])
    ]
    (root / "frames").mkdir()
    (root / "frames" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in frames) + "\n{broken\n")
    corpus = {"id": "financial_en_1", "prompt": [{"role": "user", "content": _text(60, 3)}], "question": "Q?"}
    (root / "corpusqa").mkdir()
    (root / "corpusqa" / "set1.jsonl").write_text(json.dumps({**corpus, "answer": "[]"}) + "\n")
    lb1 = {"input": "Q-yes who?", "context": _text(50, 4), "answers": ["Ada"], "length": 50, "_id": "h1"}
    (root / "longbench_v1_qa").mkdir()
    (root / "longbench_v1_qa" / "hotpotqa.jsonl").write_text(json.dumps(lb1) + "\n")
    (root / "longbench_v1_qa" / "qasper.jsonl").write_text(json.dumps({**lb1, "input": "who?", "_id": "q1"}) + "\n")


class _JudgeStub(http.server.BaseHTTPRequestHandler):
    """[[YES]] iff the problem contains "Q-yes"; counts requests."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        verdict = "[[YES]]" if "Q-yes" in body["messages"][-1]["content"] else "[[NO]]"
        data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tokenizer = train_bpe_tokenizer([_text(200, s) for s in range(20)], vocab_size=400)
    tokenizer_file = tokenizer.save(root / "tok")
    config = dataclasses.replace(qlx.load_config(CONFIGS / "models/tiny-dense.yaml").model, vocab_size=512)
    model = build_model(config, seed=0)
    judge = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _JudgeStub)
    judge.requests = []
    threading.Thread(target=judge.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    data = root / "data"
    data.mkdir()
    _write_data(data)
    with serve_in_thread(model, tokenizer, model_name="tiny") as url:
        yield {"url": url, "tok": tokenizer_file, "data": data, "judge": judge, "root": root, "model": model}
    judge.shutdown()
    judge.server_close()


def _args(served, out, *extra):
    args = ["eval", "--data", str(served["data"]), "--out", str(out), "--url", served["url"], "--model", "tiny"]
    args += ["--tokenizer", str(served["tok"]), "--max-new-tokens", "4", "--max-input-tokens", "400", "--quiet"]
    return args + list(extra)


def test_six_benchmarks_resume_rescore_compare(served, tmp_path, capsys):
    judge_url = f"http://127.0.0.1:{served['judge'].server_port}/v1"
    out = tmp_path / "run"
    args = _args(served, out, "--samples", "2", "--judge-url", judge_url, "--judge-model", "stub-judge")
    assert cli_main(args) == 0
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 11 and len({r["key"] for r in rows}) == len(rows)  # 11 items × 2 samples
    assert {r["seed"] for r in rows if r["id"] == "lb0"} == {request_seed(0, "longbench_v2", "lb0", s) for s in (0, 1)}
    lb2 = {r["id"]: r for r in rows if r["benchmark"] == "longbench_v2"}
    assert lb2["lb2"]["truncated"] and not lb2["lb0"]["truncated"] and lb2["lb2"]["prompt_tokens"] > 400
    assert all("context" not in r["record"] and r["usage"]["completion_tokens"] <= 4 for r in rows)
    report = json.loads((out / "report.json").read_text())
    assert report["complete_table7"] and list(report["benchmarks"]) == list(E.NAMES)
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    for s in scores:  # every stored score is the pure scorer's verdict with the same judge rule
        row = next(r for r in rows if r["key"] == s["key"])
        judge = lambda p, pred, g: "[[YES]]" if "Q-yes" in p else "[[NO]]"  # noqa: E731
        assert s["score"] == E.score(row["benchmark"], row["response"], row["record"], judge=judge)
    bench = report["benchmarks"]
    assert bench["frames"]["score"]["mean"] == 50.0 and bench["docmath"]["score"]["mean"] == 50.0
    assert bench["longbench_v1_qa"]["score"]["mean"] == 50.0  # macro: hotpotqa 100, qasper 0
    assert bench["longbench_v2"]["rates"]["truncated"] == pytest.approx(33.33)
    assert json.loads((out / "load_report.json").read_text())["frames"]["malformed"] == 1
    assert (out / "score_vs_length.png").stat().st_size > 1000 and "| DocMath |" in (out / "report.md").read_text()
    asked = len(served["judge"].requests)
    prompts = {json.dumps(r["messages"]) for r in served["judge"].requests}
    assert asked == len(prompts) >= 8  # docmath, frames, corpusqa, LBV1 rows with rule < 1; each prompt asked once
    capsys.readouterr()
    assert cli_main(args) == 0  # rerun: nothing regenerated, the judge's replies come from the cache
    assert "(22 already stored)" in capsys.readouterr().out
    assert len((out / "generations.jsonl").read_text().splitlines()) == 22 and len(served["judge"].requests) == asked
    assert cli_main(["eval", "--rescore", str(out), "--quiet"]) == 0  # rule only now
    rescored = json.loads((out / "report.json").read_text())["benchmarks"]
    assert rescored["frames"]["score"]["mean"] == 0.0 and rescored["mrcr"] == bench["mrcr"]
    capsys.readouterr()
    assert cli_main(["eval", "--compare", str(out), str(out)]) == 0
    assert "| MRCR | 1 |" in capsys.readouterr().out
    assert cli_main(_args(served, out, "--seed", "1")) == 2  # a different run in the same folder is refused
    assert cli_main(_args(served, tmp_path / "m", "--agent", "memory")) == 2
    assert "--agent memory runs the memory agent in process: pass --ckpt" in capsys.readouterr().err


def test_resume_after_sigkill_loses_and_repeats_nothing(served, tmp_path):
    out = tmp_path / "killed"
    args = _args(served, out, "--benchmarks", "longbench_v2", "--samples", "2", "--concurrency", "1")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "qlx.cli", *args], env=env, stderr=subprocess.DEVNULL)
    store = out / "generations.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not store.exists() or len(store.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = store.read_text().splitlines()
    assert 2 <= len(before) < 6, "killed mid-run"
    with store.open("a") as f:
        f.write('{"key": "torn')  # a write cut by the kill
    assert cli_main(args) == 0
    after = store.read_text().splitlines()
    assert after[: len(before)] == before, "stored generations are never rewritten"
    keys = [json.loads(line)["key"] for line in after]
    assert len(keys) == len(set(keys)) == 6  # 3 items × 2 samples, each once


def _hf_checkpoint(served, tmp_path):
    ckpt = tmp_path / "hf"
    qlx.save_hf(served["model"], ckpt)
    (ckpt / "tokenizer.json").write_bytes(Path(served["tok"]).read_bytes())
    return ckpt


def test_ckpt_backend_in_process(served, tmp_path):
    ckpt = _hf_checkpoint(served, tmp_path)
    out = tmp_path / "local"
    args = ["eval", "--benchmarks", "mrcr", "--data", str(served["data"]), "--out", str(out), "--ckpt", str(ckpt)]
    assert cli_main([*args, "--dtype", "float32", "--max-new-tokens", "4", "--quiet"]) == 0
    (row,) = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert row["usage"]["completion_tokens"] <= 4 and row["finish_reason"] in ("stop", "length")
    assert row["split"]["bin"] == "out-of-range"  # a 100-token conversation is below the card's first bin


def test_memory_agent_backend_equals_the_reference_loop(served, tmp_path):
    """--agent memory: each stored answer is the one qlx.memory.run_reference gives for the benchmark's
    (document, question, instructions) split, the request's seed and settings (greedy, so token for token)."""
    ckpt = _hf_checkpoint(served, tmp_path)
    out = tmp_path / "memory"
    args = ["eval", "--benchmarks", "longbench_v2,mrcr", "--data", str(served["data"]), "--out", str(out)]
    args += ["--ckpt", str(ckpt), "--agent", "memory", "--chunk-tokens", "48", "--memory-tokens", "6", "--limit", "2"]
    assert cli_main([*args, "--dtype", "float32", "--max-new-tokens", "4", "--temperature", "0", "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert sorted(r["benchmark"] for r in rows) == ["longbench_v2", "longbench_v2", "mrcr"]
    assert max(r["memory_turns"] for r in rows) >= 2  # the 40-word LongBench-V2 context spans several chunks
    tokenizer, model = load_tokenizer(served["tok"]), qlx.load_hf(ckpt, dtype="float32")
    records = {
        (b, i.id): i for b in ("longbench_v2", "mrcr") for i in E.benchmarks.module(b).load(served["data"] / b).items
    }
    for row in rows:
        item = records[(row["benchmark"], row["id"])]
        document, question, instructions = E.benchmarks.module(row["benchmark"]).memory_inputs(item.record, "ql")
        config = MemoryAgentConfig(chunk_tokens=48, memory_tokens=6, final_tokens=4, temperature=0.0, top_p=0.95)
        query = (question, instructions) if instructions else question
        want = run_reference(model, tokenizer, [query], [document], config, seed=row["seed"])
        assert row["response"] == want.answers[0] and row["memory_turns"] == int(want.num_chunks[0])
    assert (
        cli_main(
            [
                "eval",
                "--benchmarks",
                "mrcr",
                "--data",
                str(served["data"]),
                "--out",
                str(out),
                "--url",
                served["url"],
                "--model",
                "tiny",
                "--agent",
                "memory",
            ]
        )
        == 2
    )


def test_memory_inputs_are_the_single_pass_prompt_split(tmp_path):
    """What the memory agent reads (document) and is asked (question, format line) is what the benchmark's own QL
    prompt holds: all three occur in it (CorpusQA: its question field and the agent's own format line; MRCR: the
    document is the conversation before the last message)."""
    _write_data(tmp_path)
    for name in E.NAMES:
        mod = E.benchmarks.module(name)
        for item in mod.load(tmp_path / name).items:
            prompt = "\n".join(m["content"] for m in mod.messages(item.record, "ql"))
            document, question, instructions = mod.memory_inputs(item.record, "ql")
            # CorpusQA's question is its record's own field (the released prompt embeds it after the corpus)
            assert question.strip() and question in (item.record["question"] if name == "corpusqa" else prompt), name
            if name == "mrcr":
                conversation = mod.messages(item.record, "ql")
                assert all(m["content"] in document for m in conversation[:-1]) and not instructions
            else:
                assert document.strip() and document in prompt, name
            if name != "corpusqa":
                assert instructions in prompt, name
