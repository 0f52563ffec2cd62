"""qlx.merge.merge_checkpoints / `qlx merge` on tiny Qwen3-MoE checkpoints saved by transformers: each tensor equals
merge_tensor on that tensor, shared deltas survive, transformers and qlx give the same logits on the merged directory,
an interrupted merge resumes without rewriting finished shards and gives the same bytes, bad inputs are refused."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

import qlx
from qlx.cli import main as qlx_main
from qlx.merge import MergeError, merge_checkpoints, merge_tensor
from qlx.models.hf import tensor_index
from qlx.models.safetensors_io import Reader

CONFIG = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=32,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=8,
    mlp_only_layers=[0],
)
TOKENS = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (2, 12))


def shared(name):
    return "self_attn" in name or "embed" in name


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """base, and two models: the same delta on `shared` tensors, independent deltas elsewhere, norm untouched."""
    root = tmp_path_factory.mktemp("merge")
    torch.manual_seed(0)
    base = Qwen3MoeForCausalLM(Qwen3MoeConfig(**CONFIG)).eval()
    base.save_pretrained(root / "base")
    generator = torch.Generator().manual_seed(1)
    common = {n: 0.02 * torch.randn(p.shape, generator=generator) for n, p in base.named_parameters()}
    for i in (1, 2):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name == "model.norm.weight":
                    continue
                p.add_(common[name] if shared(name) else 0.02 * torch.randn(p.shape, generator=generator))
        model.save_pretrained(root / f"m{i}", max_shard_size="20KB" if i == 2 else "5GB")
    return root


def tensors(directory):
    reader = Reader()
    return {name: np.array(reader.get(info)) for name, info in tensor_index(directory).items()}


def test_merge_matches_merge_tensor_shared_delta_and_transformers_logits(dirs, tmp_path):
    out = merge_checkpoints(dirs / "base", [dirs / "m1", dirs / "m2"], tmp_path / "out", max_shard_bytes=12_000)
    assert len(set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    base, m1, m2, merged = (tensors(d) for d in (dirs / "base", dirs / "m1", dirs / "m2", out))
    assert set(merged) == set(base) and any(".mlp.experts.3.up_proj." in n for n in merged)
    for name, b in base.items():
        assert merged[name].dtype == b.dtype and merged[name].shape == b.shape
        np.testing.assert_array_equal(merged[name], merge_tensor("sce", b, [m1[name], m2[name]]), err_msg=name)
        if shared(name):
            np.testing.assert_allclose(merged[name], m1[name], rtol=1e-6, atol=1e-7, err_msg=name)
    np.testing.assert_array_equal(merged["model.norm.weight"], base["model.norm.weight"])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.from_numpy(TOKENS)).logits.numpy()
    logits = np.asarray(qlx.load_hf(out)(TOKENS))
    assert np.abs(logits - ref).max() <= 1e-4


def test_cli_bf16_workers_and_resume_give_the_same_bytes(dirs, tmp_path):
    args = ["merge", "--base", str(dirs / "base"), "--models", str(dirs / "m1"), str(dirs / "m2")]
    args += ["--select-topk", "0.5", "--dtype", "bfloat16", "--max-shard-gb", str(6_000 / 2**30)]
    assert qlx_main([*args, "--out", str(tmp_path / "once")]) == 0
    once = sorted(p.name for p in (tmp_path / "once").iterdir())
    assert "model.safetensors.index.json" in once and "merge-plan.json" in once
    merged = tensors(tmp_path / "once")
    assert all(str(a.dtype) == "bfloat16" for a in merged.values())
    config = json.loads((tmp_path / "once" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"

    # parallel workers: identical bytes
    assert qlx_main([*args, "--out", str(tmp_path / "parallel"), "--workers", "3"]) == 0
    for name in once:
        if name != "merge-plan.json":
            assert (tmp_path / "parallel" / name).read_bytes() == (tmp_path / "once" / name).read_bytes(), name

    # killed after the first shard (an injected failure), plus a stale partial file of the second
    def fail(name):
        raise KeyboardInterrupt(name)

    params = dict(select_topk=0.5, dtype="bfloat16", max_shard_bytes=6_000)
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoints(dirs / "base", [dirs / "m1", dirs / "m2"], tmp_path / "resumed", on_shard=fail, **params)
    first = sorted((tmp_path / "resumed").glob("model-*.safetensors"))
    assert len(first) == 1
    stamp = first[0].stat()
    second = first[0].name.replace("00001-of", "00002-of")
    (tmp_path / "resumed" / (second + ".partial")).write_bytes(b"junk")
    written = []
    merge_checkpoints(
        dirs / "base", [dirs / "m1", dirs / "m2"], tmp_path / "resumed", on_shard=written.append, **params
    )
    assert first[0].name not in written and second in written
    assert (first[0].stat().st_mtime_ns, first[0].stat().st_ino) == (stamp.st_mtime_ns, stamp.st_ino)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == once
    for name in once:
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "once" / name).read_bytes(), name

    # a rerun with other parameters is refused (not mixed into the finished merge)
    with pytest.raises(MergeError, match="'method' differs"):
        merge_checkpoints(dirs / "base", [dirs / "m1", dirs / "m2"], tmp_path / "resumed", select_topk=0.4)


def test_mismatched_inputs_are_refused_by_name(dirs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(dirs / "m1", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 4}))
    with pytest.raises(MergeError, match=r"models\[1\].*moe_intermediate_size = 4"):
        merge_checkpoints(dirs / "base", [dirs / "m1", other], tmp_path / "o1")
    (other / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "model.safetensors")
    weights["model.layers.1.mlp.experts.2.gate_proj.weight"] = torch.zeros(8, 15)
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"tensor model\.layers\.1\.mlp\.experts\.2\.gate_proj\.weight .*shape"):
        merge_checkpoints(dirs / "base", [other], tmp_path / "o2")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {}\n")
    with pytest.raises(MergeError, match=r"models\[0\] .*run: a qlx run folder whose parameters cannot be read"):
        merge_checkpoints(dirs / "base", [run], tmp_path / "o3")
    assert qlx_main(["merge", "--base", str(dirs / "base"), "--models", str(run), "--out", str(tmp_path / "o4")]) == 2
    with pytest.raises(MergeError, match="already holds"):
        (tmp_path / "o5").mkdir()
        (tmp_path / "o5" / "model.safetensors").write_bytes(b"")
        merge_checkpoints(dirs / "base", [dirs / "m1"], tmp_path / "o5")


def test_run_folder_inputs_are_exported_and_merge_like_their_hf_export(dirs, tmp_path):
    """A qlx run folder (config.yaml + orbax checkpoints) is read through qlx.models.checkpoint_io, exported once
    under ``<out>.inputs``, and merges to the same bytes as the Hugging Face directory it was made from."""
    import yaml
    from flax import nnx

    from qlx.config import to_dict
    from qlx.train.checkpoint import Checkpointer

    model = qlx.load_hf(dirs / "m1")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": to_dict(model.config)}))
    ckpt = Checkpointer(run / "checkpoints", async_save=False)
    ckpt.save(3, {"params": nnx.split(model, nnx.Param, ...)[1]}, {})
    ckpt.close()
    want = merge_checkpoints(dirs / "base", [dirs / "m1"], tmp_path / "from-hf", progress=False)
    got = merge_checkpoints(dirs / "base", [run], tmp_path / "from-run", progress=False)
    assert (tmp_path / "from-run.inputs" / "model-0" / "exported.json").is_file()
    reader = Reader()
    a, b = tensor_index(want), tensor_index(got)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(np.asarray(reader.get(a[name])), np.asarray(reader.get(b[name])), err_msg=name)
