"""A toy record set, tokenizer and config for the trainer tests (imported by the other test_train_* files)."""

import random
from pathlib import Path

import qlx
from qlx.data.records import Record, read_jsonl, write_jsonl
from qlx.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from qlx.train.inputs import PromptBuilder, target_text

NAMES = ("Arlen", "Bima", "Corvo", "Dessa", "Elkin", "Fenna", "Gorm", "Hild")


def toy_records(n: int, seed: int, task_types=("mc", "numerical")) -> list[Record]:
    """Short look-up questions: a context lists codes per name; the question asks for one name's code."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        names = rng.sample(NAMES, 3)
        codes = [str(rng.randint(10, 99)) for _ in names]
        context = " ".join(f"{name} has code {code}." for name, code in zip(names, codes, strict=True))
        k = rng.randrange(3)
        task = task_types[i % len(task_types)]
        options, answer = None, codes[k]
        if task == "mc":
            wrong = [c for c in codes if c != codes[k]][:2] + [str(rng.randint(10, 99))]
            options = [codes[k], *wrong]
            rng.shuffle(options)
            answer = "ABCD"[options.index(codes[k])]
        records.append(
            Record(
                id=f"toy-{seed}-{i}",
                task_type=task,
                question=f"What is the code of {names[k]}?",
                answer=answer,
                answer_type="option" if options else "number",
                evidence={"docs": [], "facts": [], "program": {}},
                hops=1,
                length_tokens=0,
                source={"engine": "toy"},
                options=options,
                context=context,
            )
        )
    return records


def make_toy_run(tmp_path: Path, *, n: int = 32, seed: int = 0, task_types=("mc", "numerical")) -> dict:
    """Write records and a tokenizer under tmp_path; returns the config data for `qlx.config.config_from_dict`."""
    records = toy_records(n, seed, task_types)
    write_jsonl(records, tmp_path / "train.jsonl")
    texts = [r.context + " " + r.question + " " + target_text(r) for r in records] * 4
    train_bpe_tokenizer(texts, vocab_size=300).save(tmp_path / "tok")
    model = qlx.load_config(Path(__file__).parents[1] / "configs/models/tiny-moe.yaml").model
    return {
        "model": {**qlx.config.to_dict(model), "vocab_size": 320, "num_layers": 1, "max_position_embeddings": 512},
        "mesh": {"fsdp": -1},
        "train": {
            "mode": "sft",
            "steps": 4,
            "batch_size": 4,
            "run_dir": str(tmp_path / "run"),
            "checkpoint_every": 2,
            "progress": False,
            "optimizer": {"learning_rate": 1e-3, "weight_decay": 0.0},
        },
        "data": {
            "train_files": [str(tmp_path / "train.jsonl")],
            "tokenizer": str(tmp_path / "tok"),
            "max_input_tokens": 320,
            "max_output_tokens": 16,
            "chat_mode": "no_think",
        },
    }


def test_toy_records_round_trip_and_prompts_fit(tmp_path):
    data = make_toy_run(tmp_path, n=8)
    records = list(read_jsonl(tmp_path / "train.jsonl"))
    assert [r.id for r in records] == [r.id for r in toy_records(8, 0)]
    tok = load_tokenizer(tmp_path / "tok")
    builder = PromptBuilder(tok, max_input_tokens=data["data"]["max_input_tokens"], chat_mode="no_think")
    for record in records:
        ids = builder.prompt_ids(record, tmp_path)
        text = tok.decode(ids)
        assert record.context in text and record.question in text and len(ids) <= 320
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert builder.target_ids(record)[-1] == tok.eos_id
