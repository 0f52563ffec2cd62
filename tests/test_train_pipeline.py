"""`qlx pipeline` end to end on a tiny CPU pipeline (two short training stages, an SCE merge of both onto the base,
a last stage from the merge), the rerun that skips finished stages, --dry-run, and bad pipeline files."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_train_toydata import make_toy_run

import qlx
from qlx.cli import main
from qlx.config import config_from_dict, to_dict
from qlx.merge import merge_tensor
from qlx.models.hf import tensor_index
from qlx.models.safetensors_io import Reader
from qlx.train.pipeline import PipelineError, load_pipeline, plan, run_pipeline

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    data = make_toy_run(tmp, n=16)
    data["train"].update(steps=2, checkpoint_every=2)
    config = config_from_dict(data)
    (tmp / "stage.yaml").write_text(yaml.safe_dump(to_dict(config)))
    qlx.save_hf(qlx.models.build_model(config.model, seed=3), tmp / "base")
    spec = {
        "run_dir": str(tmp / "runs"),
        "base": str(tmp / "base"),
        "stages": [
            {"name": "s1", "config": "stage.yaml", "init": "base"},
            {"name": "s2", "config": "stage.yaml", "init": "s1", "overrides": ["train.optimizer.learning_rate=3e-3"]},
            {"name": "merge", "kind": "merge", "base": "base", "models": ["s1", "s2"], "params": {"select_topk": 0.5}},
            {"name": "s3", "config": "stage.yaml", "init": "merge", "overrides": ["train.steps=1"]},
        ],
    }
    (tmp / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    return tmp


def tensors(directory):
    reader = Reader()
    return {name: np.array(reader.get(info)) for name, info in tensor_index(directory).items()}


@pytest.mark.slow
def test_tiny_pipeline_runs_end_to_end_and_rerun_skips(tiny, capsys):
    path = tiny / "pipeline.yaml"
    assert main(["pipeline", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "s1" in out and "pending" in out and "320/16" in out and "sce: base base + [s1, s2]" in out
    assert not (tiny / "runs").exists()

    assert main(["pipeline", "--config", str(path)]) == 0
    assert "4 stages run now: s1, s2, merge, s3" in capsys.readouterr().out
    runs = tiny / "runs"
    for name in ("s1", "s2", "merge", "s3"):
        assert (runs / name / "stage-complete.json").is_file() and (runs / name / "config.yaml").is_file()
    assert yaml.safe_load((runs / "s2" / "config.yaml").read_text())["train"]["init_from"] == str(runs / "s1")
    assert yaml.safe_load((runs / "s3" / "config.yaml").read_text())["train"]["init_from"] == str(runs / "merge/model")
    assert json.loads((runs / "s3" / "stage-complete.json").read_text())["step"] == 1

    # the merge is SCE of the exported stage parameters onto the base, tensor by tensor
    base, s1, s2 = (tensors(d) for d in (tiny / "base", runs / "merge/inputs/s1", runs / "merge/inputs/s2"))
    merged = tensors(runs / "merge/model")
    assert not np.array_equal(s1["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    for name in merged:
        np.testing.assert_array_equal(
            merged[name], merge_tensor("sce", base[name], [s1[name], s2[name]], select_topk=0.5)
        )

    stamp = (runs / "s3" / "stage-complete.json").stat().st_mtime_ns
    assert main(["pipeline", "--config", str(path)]) == 0
    assert "0 stages run now: none" in capsys.readouterr().out
    assert (runs / "s3" / "stage-complete.json").stat().st_mtime_ns == stamp
    assert main(["pipeline", "--config", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("done") == 4


def test_bad_pipeline_files_are_refused_by_name(tmp_path):
    def write(spec):
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
        return tmp_path / "p.yaml"

    stage = {"name": "a", "config": "x.yaml"}
    with pytest.raises(PipelineError, match=r"stages\[1\] \(b\): refers to 'c'"):
        load_pipeline(write({"base": "B", "stages": [stage, {"name": "b", "config": "x.yaml", "init": "c"}]}))
    with pytest.raises(PipelineError, match="name 'a' is used twice"):
        load_pipeline(write({"stages": [stage, stage]}))
    with pytest.raises(PipelineError, match="unknown key 'inti'"):
        load_pipeline(write({"stages": [{**stage, "inti": "base"}]}))
    with pytest.raises(PipelineError, match="uses 'base' but the pipeline has no base"):
        load_pipeline(write({"stages": [{**stage, "init": "base"}]}))
    with pytest.raises(PipelineError, match="a merge stage needs 'models'"):
        load_pipeline(write({"base": "B", "stages": [{"name": "m", "kind": "merge"}]}))
    with pytest.raises(PipelineError, match=r"stages\[0\] \(m\): a memory_rl stage needs 'config'"):
        load_pipeline(write({"stages": [{"name": "m", "kind": "memory_rl"}]}))


def test_memory_stage_must_train_in_memory_mode(tiny):
    """A memory_rl stage runs the trainer on a train.mode: memory config; a config in another mode is refused naming
    the stage and file (and a train stage may not be in memory mode), before anything runs."""
    spec = yaml.safe_load((tiny / "pipeline.yaml").read_text())
    spec["run_dir"] = str(tiny / "runs-memory")
    spec["stages"] = [{"name": "memory", "kind": "memory_rl", "config": "stage.yaml", "init": "base"}]
    (tiny / "memory-pipeline.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(PipelineError, match=r"stage memory \(memory_rl\): .*stage.yaml has train.mode 'sft'"):
        run_pipeline(load_pipeline(tiny / "memory-pipeline.yaml"))
    assert not (tiny / "runs-memory").exists()


@pytest.mark.parametrize("hardware", ["tpu-v5p", "gpu-8xh100"])
def test_recipe_pipelines_plan_the_memory_expert(hardware):
    rows = plan(load_pipeline(CONFIGS / f"qwen3-30b-a3b/{hardware}-pipeline.yaml"))
    memory = next(r for r in rows if r["stage"] == "memory")
    assert (
        memory["kind"] == "memory_rl"
        and "(memory, " in memory["init"]
        and memory["init"].endswith("stage3 (memory, 50 steps)")
    )
    assert memory["in/out"] == "chunk 32768, memory 15360/15360"
    assert [r["stage"] for r in rows] == ["stage1", "stage2", "stage3", "memory", "merge", "stage4"]
