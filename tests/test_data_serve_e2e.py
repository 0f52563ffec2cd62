"""The LLM-backed synthesis parts end to end against `qlx serve` on localhost, with a tiny random model.

Content quality is not the point (a random model proposes nothing usable); the protocol is: every request of the
proposer-solver-verifier engine reaches the real server and comes back as a chat reply, and each unusable reply is
reported as a rejected round rather than raised or silently dropped.
"""

import dataclasses
from pathlib import Path

import pytest

import qlx
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
