"""`qlx train` refuses bad configs and data before any compute, and the loop stops on repeated non-finite steps."""

import json
import re
from pathlib import Path

import pytest
import yaml
from test_train_toydata import make_toy_run

from qlx.cli import main
from qlx.config import ConfigError, config_from_dict, to_dict
from qlx.train.metrics import read_metrics
from qlx.train.trainer import TrainingStopped, train


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toy")
    data = make_toy_run(tmp, n=16)
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(config_from_dict(data))))
    return tmp, path, data


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.train_files=[nowhere.jsonl]"], "data.train_files[0]: file not found: nowhere.jsonl"),
        (["data.tokenizer=missing-tok"], "data.tokenizer: missing-tok: tokenizer file not found"),
        (["rl.h_high=0.1"], "rl.h_high: must exceed h_low (0.14)"),
        (["train.mode=ppo"], "train.mode: got 'ppo'; valid values: 'sft', 'rl'"),
        (["train.optimizer.lr=1"], "train.optimizer.lr: unknown key"),
        (["model.vocab_size=128"], "model.vocab_size: 128 is smaller than the tokenizer's vocabulary"),
        (["mesh.fsdp=3"], "mesh: mesh: data=1 x fsdp=3"),
        (["data.task_types=[mc]"], "data.task_types: data.task_types ['mc'] lacks task types found in the data"),
        (["train.mode=rl", "data.task_types=[mc, numerical, poetry]"], "no reward verifier for ['poetry']"),
        (["train.mode=rl", "train.micro_batch_size=1000"], "train.micro_batch_size: 1000 exceeds the 32 sequences"),
        (["train.init_from=nowhere"], "train.init_from: nowhere does not exist"),
        (["data.max_input_tokens=4000"], "exceeds model.max_position_embeddings (512)"),
        (["data.max_input_tokens=24"], "data.max_input_tokens: 24 is too small: the prompt of record"),
        (["seed=-1"], "seed: must be in [0, 2**63) (got -1)"),
        (["rollout.max_sequences=-8"], "rollout.max_sequences: must be >= 0 (0: a step's rollouts in one call)"),
        (["train.optimizer.learning_rate=.inf"], "train.optimizer.learning_rate: must be a finite number (got inf)"),
    ],
)
def test_bad_config_fails_before_compute(toy, capsys, overrides, message):
    tmp, path, _ = toy
    run_dir = tmp / "never"
    args = ["train", "--config", str(path), "--set", f"train.run_dir={run_dir}"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not run_dir.exists()


def test_malformed_record_names_file_and_line(toy, tmp_path, capsys):
    _, path, data = toy
    lines = Path(data["data"]["train_files"][0]).read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], lines[1][:40], lines[2]]) + "\n")
    args = ["train", "--config", str(path), "--set", f"data.train_files=[{bad}]"]
    assert main(args + ["--set", f"train.run_dir={tmp_path / 'r'}"]) == 2
    assert f"{bad}:2: invalid JSON" in capsys.readouterr().err


def test_malformed_records_are_counted_and_listed_before_compute(toy, tmp_path, capsys):
    """Every malformed line is reported with file:line and field (none dropped, none left for a training step)."""
    _, path, data = toy
    lines = Path(data["data"]["train_files"][0]).read_text().splitlines()
    record = json.loads(lines[0])
    bad_lines = {
        "null": "null",
        "question": json.dumps({**record, "question": None}),
        "context": json.dumps({**record, "context": 12}),
        "task_type": json.dumps({**record, "task_type": "poetry"}),
        "context_ref": json.dumps({**record, "context": None, "context_ref": {"path": "gone.txt", "chars": 5}}),
        "utf8": json.dumps({**record, "question": "caf\u00e9?"}, ensure_ascii=False),
    }
    bad = tmp_path / "bad.jsonl"
    body = "\n".join([lines[0], *bad_lines.values(), lines[1]]).encode().replace("é".encode(), b"\xe9")
    bad.write_bytes(body + b"\n")
    run_dir = tmp_path / "r"
    assert (
        main(
            ["train", "--config", str(path), "--set", f"data.train_files=[{bad}]", "--set", f"train.run_dir={run_dir}"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "data.train_files: 6 of 8 records are malformed" in err, err
    for lineno, field in enumerate(
        [
            "",
            "question: expected a string, got null",
            "context: expected a string or null",
            "task_type: 'poetry' is not one of",
            "context_ref: ",
            "invalid UTF-8 at byte",
        ],
        2,
    ):
        assert f"{bad}:{lineno}: {field}" in err, (lineno, err)
    assert not run_dir.exists()


def test_init_from_other_architecture_is_refused(toy, tmp_path):
    _, _, data = toy
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoints").mkdir()
    (other / "config.yaml").write_text(yaml.safe_dump({"model": {**data["model"], "hidden_size": 32}}))
    with pytest.raises(ConfigError, match=r"train.init_from: .* hidden_size=32 \(config: 64\)"):
        train(config_from_dict(data, [f"train.init_from={other}", f"train.run_dir={tmp_path / 'r'}"]))


def test_repeated_nonfinite_steps_stop_the_run(toy, tmp_path):
    """lr 1e30: the first update blows the weights up, every later loss is inf/nan and is skipped; 3 in a row stop."""
    _, _, data = toy
    config = config_from_dict(
        data,
        [
            "train.optimizer.learning_rate=1e30",
            "train.optimizer.grad_clip=0.0",
            "train.steps=10",
            "train.max_nonfinite_steps=3",
            f"train.run_dir={tmp_path / 'r'}",
        ],
    )
    with pytest.raises(TrainingStopped, match="3 steps in a row had a non-finite loss or gradient"):
        train(config)
    records = read_metrics(tmp_path / "r")
    assert [r["skipped"] for r in records] == [0, 1, 1, 1]
    assert isinstance(records[1]["loss"], str) or records[1]["grad_norm"] != records[1]["grad_norm"]
    assert json.loads((tmp_path / "r" / "status.json").read_text()) == {"step": 4, "status": "stopped"}


def test_max_input_tokens_minimum_is_exact(toy, tmp_path):
    """The minimum preflight names is the smallest max_input_tokens that encodes every record (the template plus the
    two context tokens middle truncation keeps)."""
    from qlx.train.preflight import preflight

    _, _, data = toy
    with pytest.raises(ConfigError, match="need at least") as info:
        preflight(config_from_dict(data, ["data.max_input_tokens=24"]))
    assert info.value.key == "data.max_input_tokens"
    needed = int(re.search(r"need at least (\d+)", str(info.value)).group(1))
    dataset = preflight(config_from_dict(data, [f"data.max_input_tokens={needed}"])).dataset
    assert max(len(dataset.prompt(i)) for i in range(len(dataset))) <= needed
    with pytest.raises(ConfigError, match=f"{needed - 1} is too small"):
        preflight(config_from_dict(data, [f"data.max_input_tokens={needed - 1}"]))
