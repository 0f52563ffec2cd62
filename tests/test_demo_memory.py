"""`qlx demo --memory`: a missing base model, and the warm start's evidence-based targets against their rule (the
quick memory demo end to end runs in tests/test_demo.py, from the quick demo there as its base)."""

from qlx.cli import main
from qlx.config import ModelConfig
from qlx.data.demo_data import make_demo_dataset
from qlx.data.prompts import question_parts
from qlx.memory import MemoryAgentConfig, MemoryTemplate, run_reference
from qlx.memory.templates import render_text, tokenize_template
from qlx.memory.warm_start import warm_start_turns
from qlx.models import build_model

TEMPLATE = MemoryTemplate(
    update="Question: {question}\nMemory: {memory}\nText: {chunk}\nNew memory:",
    final="Question: {question}\nMemory: {memory}\n{instructions}\nAnswer:",
    no_memory="none",
)


def test_a_missing_base_runs_the_full_demo_into_it_first(tmp_path, monkeypatch):
    """No finished full-context demo in --base: ``qlx demo`` runs into that folder first (same seed, size and
    overrides), and its failure stops the memory demo with its exit code. (The memory demo from a finished base runs
    end to end in tests/test_demo.py, after the quick demo that is its base.)"""
    import qlx.demo

    calls, run = [], qlx.demo.run

    def full_demo_fails(args):  # `qlx demo --memory` itself goes through qlx.demo.run too
        return run(args) if args.memory else calls.append(vars(args)) or 3

    monkeypatch.setattr(qlx.demo, "run", full_demo_fails)
    base = tmp_path / "base"
    argv = ["demo", "--memory", "--quick", "--out", str(tmp_path / "m"), "--base", str(base), "--seed", "5",
            "--set", "model.num_layers=1"]  # fmt: skip
    assert main(argv) == 3
    assert len(calls) == 1 and calls[0]["out"] == str(base) and calls[0]["memory"] is False
    assert calls[0]["seed"] == 5 and calls[0]["quick"] and calls[0]["overrides"] == ["model.num_layers=1"]


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
