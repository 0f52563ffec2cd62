"""`qlx demo --memory --quick` end to end, and the warm start's evidence-based targets against their rule."""

import json

import numpy as np
import yaml

from qlx.cli import main
from qlx.config import ModelConfig
from qlx.data.demo_data import make_demo_dataset
from qlx.data.prompts import question_parts
from qlx.memory import MemoryAgentConfig, MemoryTemplate, run_reference
from qlx.memory.templates import render_text, tokenize_template
from qlx.memory.warm_start import warm_start_turns
from qlx.models import build_model
from qlx.train.metrics import read_metrics

TEMPLATE = MemoryTemplate(
    update="Question: {question}\nMemory: {memory}\nText: {chunk}\nNew memory:",
    final="Question: {question}\nMemory: {memory}\n{instructions}\nAnswer:",
    no_memory="none",
)


def test_quick_memory_demo_runs_every_stage(tmp_path, capsys):
    """With no finished full-context demo in --base, it runs one there first, then starts from its model and
    tokenizer."""
    out, base = tmp_path / "demo", tmp_path / "base"
    argv = ["demo", "--memory", "--quick", "--out", str(out), "--base", str(base), "--set", "model.num_layers=1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"no finished full-context demo in {base}; running `qlx demo` into it first" in printed
    assert (base / "results.json").is_file()
    assert (out / "data" / "tokenizer.json").read_bytes() == (base / "data" / "tokenizer.json").read_bytes()
    assert yaml.safe_load((out / "sft" / "config.yaml").read_text())["train"]["init_from"] == str(base / "rl")
    for line in ("\nmultihop ", "\nreading ", "\nall ", "  1x (", "  2x (", "  4x (", "truncated to one window"):
        assert line in printed
    results = json.loads((out / "results.json").read_text())
    assert results["before"]["all"]["n"] == results["after"]["all"]["n"] > 0
    assert set(results["by_length"]) == {k for k in results["by_length"] if k[:2] in ("1x", "2x", "4x")}
    assert len(results["by_length"]) == 3 and all(isinstance(v, bool) for v in results["targets"].values())
    sft, rl = read_metrics(out / "sft"), read_metrics(out / "rl")
    assert [r["step"] for r in sft] == [1, 2] and [r["step"] for r in rl] == [1]
    assert {"memory/turns", "memory/conversations", "reward/mean"} <= set(rl[0]) and rl[0]["memory/turns"] >= 2
    assert (out / "accuracy.png").stat().st_size > 5000
    held_out = [json.loads(x) for x in (out / "data" / "eval_4x.jsonl").read_text().splitlines()]
    trained = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert not {r["question"] for r in held_out} & {r["question"] for r in trained}
    assert np.mean([r["length_tokens"] for r in held_out]) > 2 * np.mean([r["length_tokens"] for r in trained])


def test_warm_start_targets_are_the_evidence_seen_so_far():
    records, _, tokenizer = make_demo_dataset(
        seed=4, n_train=24, n_eval=1, max_context_tokens=256, task_types=("reading", "multihop")
    )
    config = MemoryAgentConfig(chunk_tokens=48, memory_tokens=64, final_tokens=24, template=TEMPLATE,
                               chat_mode=None, carry="response")  # fmt: skip
    template = tokenize_template(tokenizer, TEMPLATE, None)
    stop = tokenizer.eos_id
    split_facts = 0
    for record in records:
        question = question_parts(record.question, record.options)
        turns = warm_start_turns(record, tokenizer, config, question, "The answer.", stop_id=stop)
        ids = tokenizer.encode(record.context)
        k = -(-len(ids) // config.chunk_tokens)
        assert len(turns) == k + 1 and [t.final for t in turns] == [False] * k + [True]
        facts = [record.context[f["char_start"] : f["char_end"]].strip() for f in record.evidence["facts"]]
        split_facts += len({f["doc_id"] for f in record.evidence["facts"]}) > 1
        memory_text = TEMPLATE.no_memory
        for t, turn in enumerate(turns[:-1]):
            # the prompt: the text template with the previous memory and this chunk's text (decoded independently)
            chunk_text = tokenizer.decode(ids[t * 48 : (t + 1) * 48])
            values = {"question": question[0], "memory": memory_text, "chunk": chunk_text}
            assert tokenizer.decode(turn.prompt) == render_text(template.update, values)
            assert turn.target[-1] == stop
            memory = tokenizer.decode(turn.target[:-1])
            read = tokenizer.decode(ids[: (t + 1) * 48])  # everything on screen so far
            for fact, f in zip(facts, record.evidence["facts"], strict=True):
                if f["char_end"] <= len(read.rstrip()):
                    assert fact in memory  # a fact read in full is in the memory
                elif f["char_start"] >= len(read):
                    assert fact not in memory  # a fact not reached yet is not
            # every new memory token was copied from the previous memory or from the chunk on screen
            new = turn.target[:-1]
            assert all(x in set(ids[t * 48 : (t + 1) * 48]) | set(tokenizer.encode(memory_text)) for x in new)
            memory_text = memory if memory else TEMPLATE.no_memory
        assert all(fact in memory_text for fact in facts)  # the final turn sees every fact, and nothing else
        assert "".join(memory_text.split()) == "".join("".join(sorted(facts, key=record.context.index)).split())
        final = turns[-1]
        values = {"question": question[0], "memory": memory_text, "instructions": question[1]}
        assert tokenizer.decode(final.prompt) == render_text(template.final, values)
        assert final.target == [*tokenizer.encode("The answer."), stop]
    assert split_facts > 0  # two-fact questions with their facts in different documents were covered


def test_warm_start_first_prompts_are_the_agents_prompts():
    """The warm start trains on the prompts the agent builds: turn 0 (no memory yet) of qlx.memory.run_reference."""
    records, _, tokenizer = make_demo_dataset(
        seed=2, n_train=4, n_eval=1, max_context_tokens=192, task_types=("reading",)
    )
    config = MemoryAgentConfig(chunk_tokens=64, memory_tokens=8, final_tokens=8, template=TEMPLATE, chat_mode=None,
                               carry="response", max_question_tokens=96, max_instruction_tokens=64,
                               temperature=0.0)  # fmt: skip
    model = build_model(_tiny(tokenizer.vocab_size))
    questions = [question_parts(r.question, r.options) for r in records]
    rollout = run_reference(model, tokenizer, questions, [r.context for r in records], config)
    for row, (record, question) in enumerate(zip(records, questions, strict=True)):
        turns = warm_start_turns(record, tokenizer, config, question, "x", stop_id=tokenizer.eos_id)
        n = int(rollout.prompt_lengths[0, row])
        assert turns[0].prompt == rollout.prompt_ids[0, row, :n].tolist()
        assert len(turns) - 1 == int(rollout.num_chunks[row])


def _tiny(vocab_size: int) -> ModelConfig:
    return ModelConfig(family="qwen3", vocab_size=vocab_size, hidden_size=32, num_layers=1, num_heads=2,
                       num_kv_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=1024,
                       tie_word_embeddings=True, initializer_range=0.2)  # fmt: skip
