"""The OpenAI-compatible client, the proposer-solver-verifier engine and LLM fact extraction, against a local stub
server (http.server on 127.0.0.1 in a thread). The end-to-end run against `qlx serve` comes with the rollout server."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from qlx.data.documents import Document
from qlx.data.engines.mase import MaseEngine
from qlx.data.extract import extract_facts
from qlx.data.llm import ChatClient, LLMConfig, LLMError, parse_json_reply
from qlx.data.records import read_jsonl
from qlx.data.synth import SynthConfig, default_tokenizer, synthesize


def _completion(content) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


class Stub:
    """A chat-completions endpoint; ``respond(body, n) -> (status, bytes[, delay_s])`` decides each reply."""

    def __init__(self, respond):
        self.respond, self.requests = respond, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, self.headers, body))  # case-insensitive names
                status, payload, *delay = stub.respond(body, len(stub.requests))
                if delay:
                    time.sleep(delay[0])
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def client(self, **kw) -> ChatClient:
        kw = {"max_retries": 2, "backoff_s": 0.0, "timeout_s": 5.0, **kw}
        return ChatClient(LLMConfig(f"http://127.0.0.1:{self.server.server_port}/v1", "tiny", "sk-test", **kw))


def test_retries_on_server_errors_and_bad_replies_then_succeeds():
    script = [(500, b"busy"), (200, b"not json"), (200, _completion(None)), (200, _completion("hello"))]
    with Stub(lambda body, n: script[n - 1]) as stub:
        client = stub.client(max_retries=3)
        assert client.chat([{"role": "user", "content": "hi"}], seed=3) == "hello"
        assert client.requests == 4 and client.retries == 3
        path, headers, body = stub.requests[-1]
        assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
        assert body["model"] == "tiny" and body["seed"] == 3 and body["messages"][0]["content"] == "hi"


def test_client_errors_fail_fast_and_exhausted_retries_name_the_last_error():
    with Stub(lambda body, n: (400, b'{"error": "context too long"}')) as stub:
        client = stub.client()
        with pytest.raises(LLMError, match="HTTP 400.*context too long"):
            client.chat([{"role": "user", "content": "x"}])
        assert client.requests == 1
    with Stub(lambda body, n: (200, _completion("late"), 0.6)) as stub:
        client = stub.client(timeout_s=0.2, max_retries=1)
        with pytest.raises(LLMError, match="2 attempts.*(timed out|Timeout)"):
            client.chat([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="QLX_LLM_URL"):
        LLMConfig.from_env({})
    with pytest.raises(ValueError, match="QLX_LLM_MODEL"):
        LLMConfig.from_env({"QLX_LLM_URL": "http://x/v1"})
    assert LLMConfig.from_env({"OPENAI_BASE_URL": "http://h/v1", "QLX_LLM_MODEL": "m"}).base_url == "http://h/v1"
    assert parse_json_reply('<think>x</think>Sure:\n```json\n{"a": [1]}\n```') == {"a": [1]}


def _words(prompt: str) -> list[str]:
    return re.findall(r"[A-Za-z]{4,}", prompt.split("Documents:")[-1].split("<text>")[-1])


def _mase_stub():
    """Proposer: 'word k' questions, its second reply not JSON; solver: reads the word; verifier: containment."""
    proposals = []

    def respond(body, n):
        system = body["messages"][0]["content"] if body["messages"][0]["role"] == "system" else ""
        user = body["messages"][-1]["content"]
        if "reading-comprehension" in system:
            proposals.append(user)
            if len(proposals) % 3 == 2:
                return 200, _completion("I would rather not answer in JSON.")
            return _propose(user)
        return _solve_or_verify(system, user)

    return respond


def _propose(user):
    k = user.count("\n- ") + 3
    question = {"question": f"Which is word number {k} of the text?", "answer": _words(user)[k - 1]}
    return 200, _completion(json.dumps(question))


def _solve_or_verify(system, user):
    if "verifying" in system:
        a1 = re.search(r"Answer 1: (.*)", user).group(1)
        a2 = re.search(r"Answer 2: (.*)", user).group(1)
        return 200, _completion("They match. [[YES]]" if a2.lower() in a1.lower() else "Different. [[NO]]")
    k = int(re.search(r"word number (\d+)", user).group(1))
    word = _words(user.split("</text>")[0])[k - 1]
    return 200, _completion(f"<think>counting</think>Therefore, the answer is the word {word}.")


def test_mase_rounds_use_history_report_rejections_and_validate(tmp_path):
    documents = "Alpha report. Harbour cranes moved northward slowly.\n\nBeta memo about grain silos."
    with Stub(_mase_stub()) as stub:
        validated, problems = MaseEngine(stub.client(), rounds=3).run(documents, seed=1)
        words = _words(documents)
        assert [(v.question, v.answer) for v in validated] == [
            ("Which is word number 3 of the text?", words[2]),
            ("Which is word number 4 of the text?", words[3]),
        ]
        assert validated[0].solver_answer == f"the word {words[2]}"
        assert len(problems) == 1 and "unusable proposal" in problems[0]
        proposer_prompts = [b["messages"][-1]["content"] for _, _, b in stub.requests if "Documents:" in str(b)]
        assert "Questions already asked" not in proposer_prompts[0]
        assert "word number 3" in proposer_prompts[-1], "the history buffer reaches the proposer"
        assert sum("verifying" in str(b) for _, _, b in stub.requests) == 2


def test_mase_engine_through_synthesize(tmp_path):
    with Stub(_mase_stub()) as stub:
        config = SynthConfig(engine="mase", n=2, min_tokens=1500, max_tokens=3000, seed=1, n_orgs=12, mase_rounds=2)
        card = synthesize(config, tmp_path, tokenizer=default_tokenizer(0), client=stub.client(), progress=False)
    records = list(read_jsonl(tmp_path / "records.jsonl"))
    assert records and card["records"] == len(records) and card["task_types"]["reading"] == len(records)
    for record in records:
        assert record.evidence["program"]["op"] == "llm_verified" and record.source["paradigm"] == "mase"
        for doc in record.evidence["docs"]:
            assert record.context[doc["char_start"] : doc["char_end"]]
        assert record.answer in record.context


def test_llm_fact_extraction_keeps_only_grounded_facts():
    doc = Document("d1", "Note", "Mira Tollan founded Orvex Labs in 1998.\n\nOrvex Labs is based in Lorvik.")
    reply = {
        "facts": [
            {
                "subject": "Orvex Labs",
                "relation": "founded by",
                "object": "Mira Tollan",
                "quote": "Mira Tollan founded Orvex Labs in 1998.",
            },
            {
                "subject": "Orvex Labs",
                "relation": "based_in",
                "object": "Lorvik",
                "quote": "Orvex Labs is based in Lorvik.",
            },
            {"subject": "Orvex Labs", "relation": "ceo", "object": "Ada", "quote": "Ada leads Orvex Labs."},
            {
                "subject": "Orvex Labs",
                "relation": "founded_year",
                "object": "1999",
                "quote": "Orvex Labs is based in Lorvik.",
            },
            {"subject": "Orvex Labs"},
        ]
    }
    with Stub(lambda body, n: (200, _completion(json.dumps(reply)))) as stub:
        facts, problems = extract_facts(stub.client(), doc)
    assert [(f.subject, f.relation, f.object) for f in facts] == [
        ("Orvex Labs", "founded_by", "Mira Tollan"),
        ("Orvex Labs", "based_in", "Lorvik"),
    ]
    for fact in facts:
        assert fact.object in doc.text[fact.start : fact.end]
    assert len(problems) == 3
    assert any("quote not found" in p for p in problems) and any("not in its quote" in p for p in problems)


def test_corpus_facts_from_the_llm_feed_the_multihop_engine(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Orvex Labs history\n\nOrvex Labs was founded by Mira Tollan in a garage.")
    (corpus / "b.txt").write_text("Mira Tollan\n\nMira Tollan was born in Lorvik, a harbour town.")
    (corpus / "c.txt").write_text("Lorvik\n\nLorvik lies in Kaldoria, on the northern coast.")
    for i in range(8):
        (corpus / f"note{i}.txt").write_text(f"Weather note {i}\n\n" + "Rain moved east over the hills today. " * 6)
    facts = {
        "Orvex": ("Orvex Labs", "founded_by", "Mira Tollan", "Orvex Labs was founded by Mira Tollan in a garage."),
        "born": ("Mira Tollan", "born in", "Lorvik", "Mira Tollan was born in Lorvik, a harbour town."),
        "lies": ("Lorvik", "located_in", "Kaldoria", "Lorvik lies in Kaldoria, on the northern coast."),
    }

    def respond(body, n):
        text = body["messages"][-1]["content"]
        keys = ("subject", "relation", "object", "quote")
        found = [dict(zip(keys, f, strict=True)) for k, f in facts.items() if k in text]
        return 200, _completion(json.dumps({"facts": found}))

    tok = default_tokenizer(0)
    with Stub(respond) as stub:
        config = SynthConfig(engine="kg", n=4, min_tokens=100, max_tokens=200, seed=0, corpus=str(corpus))
        synthesize(config, tmp_path / "out", tokenizer=tok, client=stub.client(), progress=False)
    records = list(read_jsonl(tmp_path / "out" / "records.jsonl"))
    multihop = [r for r in records if r.task_type == "multihop"]
    assert multihop, [r.question for r in records]
    expected = {
        "What is the birthplace of the founder of Orvex Labs?": "Lorvik",
        "What is the country in which the birthplace of Mira Tollan lies?": "Kaldoria",
        "What is the country in which the birthplace of the founder of Orvex Labs lies?": "Kaldoria",
    }
    for record in multihop:
        assert len({f["doc_id"] for f in record.evidence["facts"]}) == record.hops >= 2
        assert expected[record.question] == record.answer
