"""A run folder whose checkpoints no longer fit the config, or are all corrupt, stops before any training with an
error naming what differs and leaves the checkpoints alone; ``train.restart=true`` starts over and says so."""

import hashlib
import logging
import shutil

import pytest
import yaml
from test_train_toydata import make_toy_run

from qlx.cli import main
from qlx.config import ConfigError, config_from_dict, to_dict
from qlx.train.metrics import read_metrics
from qlx.train.trainer import train


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-step SFT run with checkpoints at steps 1 and 2 (and its config data)."""
    tmp = tmp_path_factory.mktemp("restart")
    data = make_toy_run(tmp, n=16)
    data["train"].update(steps=2, checkpoint_every=1, batch_size=2)
    result = train(config_from_dict(data))
    assert result.step == 2 and result.resumed_from is None
    return tmp / "run", data


def _copy(finished, tmp_path):
    run, data = finished
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", {**data, "train": {**data["train"], "run_dir": str(tmp_path / "run")}}


def _files(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def test_changed_model_key_is_refused_naming_it(finished, tmp_path, capsys):
    run, data = _copy(finished, tmp_path)
    before = _files(run / "checkpoints")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(config_from_dict(data))))
    assert main(["train", "--config", str(path), "--set", "model.moe_intermediate_size=48"]) == 2
    err = capsys.readouterr().err
    assert "model.moe_intermediate_size: 32 then, 48 now" in err, err
    assert "params.stacks.0.mlp.down.value: float32[1, 8, 48, 64] in this config, float32[1, 8, 32, 64] in the" in err
    assert "train.restart=true" in err and "train.init_from" in err and "train.run_dir" in err
    assert _files(run / "checkpoints") == before
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_changed_optimizer_tree_is_refused_naming_it(finished, tmp_path):
    run, data = _copy(finished, tmp_path)
    before = _files(run / "checkpoints")
    config = config_from_dict(data, ["train.optimizer.grad_clip=0", "train.steps=4"])
    with pytest.raises(ConfigError, match=r"train.run_dir: checkpoint .*/checkpoints/2 does not fit: opt_state\.") as e:
        train(config)
    assert "train.optimizer.grad_clip: 1.0 then, 0.0 now" in str(e.value) and "train.steps: 2 then, 4 now" in str(
        e.value
    )
    assert _files(run / "checkpoints") == before


def test_restart_sets_the_old_checkpoints_aside_and_starts_over(finished, tmp_path, caplog):
    run, data = _copy(finished, tmp_path)
    old = _files(run / "checkpoints" / "2")
    config = config_from_dict(data, ["train.optimizer.grad_clip=0", "train.restart=true"])
    with caplog.at_level(logging.WARNING, logger="qlx.train"):
        result = train(config)
    assert result.resumed_from is None and result.step == 2
    assert "starting" in caplog.text and "over from step 0" in caplog.text
    for step in (1, 2):
        assert (
            f"checkpoint step {step}" in caplog.text and str(run / "checkpoints" / f"superseded-{step}") in caplog.text
        )
    assert _files(run / "checkpoints" / "superseded-2") == old
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    # the same command again resumes (restart only starts over when the checkpoints do not fit)
    assert train(config).resumed_from == 2


def test_every_checkpoint_corrupt_refuses_to_start_over(finished, tmp_path, capsys):
    run, data = _copy(finished, tmp_path)
    for step in (1, 2):
        for p in (run / "checkpoints" / str(step) / "params").rglob("*"):
            if p.parent.name == "d":
                p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(to_dict(config_from_dict(data, ["train.steps=3"]))))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "train.restart: no usable checkpoint" in err and "Refusing to start over" in err, err
    for step in (1, 2):
        assert f"step {step}: its arrays cannot be read" in err and str(run / "checkpoints" / f"corrupt-{step}") in err
    assert [r["step"] for r in read_metrics(run)] == [1, 2]  # nothing was trained
    assert main(["train", "--config", str(path), "--set", "train.restart=true"]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
