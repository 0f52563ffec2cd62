"""The LLM-backed synthesis parts end to end against `qlx serve` on localhost, with a tiny random model.

Content quality is not the point (a random model proposes nothing usable); the protocol is: every request of the
proposer-solver-verifier engine reaches the real server and comes back as a chat reply, and each unusable reply is
reported as a rejected round rather than raised or silently dropped.
"""

import dataclasses
import json
from pathlib import Path

import pytest

import qlx
from qlx.cli import main as cli_main
from qlx.data.engines.mase import MaseEngine
from qlx.data.llm import ChatClient, LLMConfig
from qlx.data.tokenizer import train_bpe_tokenizer
from qlx.models import build_model
from qlx.rollout import serve_in_thread

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DOCUMENTS = "Alpha report. Harbour cranes moved northward slowly.\n\nBeta memo about grain silos near the river."


@pytest.fixture(scope="module")
def base_url():
    tokenizer = train_bpe_tokenizer([DOCUMENTS] * 20 + ["Which word is the answer? The answer is yes."] * 20)
    model_config = qlx.load_config(CONFIGS / "models/tiny-dense.yaml").model
    model = build_model(dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size), seed=3)
    with serve_in_thread(model, tokenizer, model_name="tiny") as url:
        yield url


def test_chat_client_round_trip(base_url):
    client = ChatClient(LLMConfig(base_url=base_url, model="tiny", max_retries=0, timeout_s=120))
    reply = client.chat([{"role": "user", "content": "Say something."}], max_tokens=8, temperature=0.0)
    assert isinstance(reply, str)
    again = client.chat([{"role": "user", "content": "Say something."}], max_tokens=8, temperature=0.0)
    assert reply == again, "greedy replies from the served model are deterministic"


def test_mase_engine_runs_every_round_against_the_server(base_url):
    client = ChatClient(LLMConfig(base_url=base_url, model="tiny", max_retries=1, timeout_s=120))
    rounds = 2
    validated, problems = MaseEngine(client, rounds=rounds, max_tokens=12).run(DOCUMENTS, seed=0)
    assert len(validated) + len(problems) == rounds, "every round ends validated or reported"
    reported = [int(p.split(":")[0].removeprefix("round ")) for p in problems]
    assert reported == sorted(set(reported)) and all(0 <= r < rounds for r in reported)


def test_synth_cli_filters_with_the_served_model(base_url, tmp_path, capsys):
    """`qlx synth --filters ...` asks the served model: a random model never answers, so knowledge grounding keeps
    every record and the robustness check (pass@k = 0) rejects every one, with its reason, into rejects.jsonl."""
    args = ["synth", "--engine", "table", "--n", "2", "--min-tokens", "64", "--max-tokens", "160", "--brief"]
    args += ["--n-orgs", "4", "--out", str(tmp_path), "--quiet", "--filters", "difficulty,grounding,robustness"]
    args += ["--filter-url", base_url, "--filter-model", "tiny", "--filter-k", "1", "--filter-max-tokens", "4"]
    assert cli_main(args) == 0
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["filters"] == {
        "grounding": {"in": 2, "kept": 2, "dropped": 0},
        "robustness": {"in": 2, "kept": 0, "dropped": 2},
        "difficulty": {"in": 0, "kept": 0, "dropped": 0},
    }
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    assert [j["reason"] for j in rejects] == ["pass@1 is 0 with 3 extra distractor documents"] * 2
    assert all(j["record"]["source"]["checks"]["grounding"] == {"correct": 0, "k": 1} for j in rejects)
    assert "| robustness | 2 | 0 | 2 |" in capsys.readouterr().out
    args[args.index("--filter-model") + 1] = "no-such-model"
    assert cli_main([*args, "--tokenizer", str(tmp_path / "tokenizer.json")]) == 1
    err = capsys.readouterr().err
    assert "HTTP 404" in err and "no-such-model" in err and "is incomplete" in err
