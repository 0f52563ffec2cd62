"""Hugging Face parity: logits and load-balancing loss vs transformers on tiny random checkpoints the tests save,
the save_hf round trip, sharded loading, `qlx convert`, and checkpoint errors."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

import qlx
from qlx.cli import main as qlx_main
from qlx.mesh import make_mesh
from qlx.models.hf import CheckpointError, config_from_hf
from qlx.models.rope import rope_frequencies

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    initializer_range=0.1,
)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}
VARIANTS = {
    "dense_tied_yarn": (Qwen3Config, Qwen3ForCausalLM, dict(tie_word_embeddings=True, rope_parameters=YARN)),
    "moe_sparse_step2_unnormalised": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(MOE, num_hidden_layers=3, decoder_sparse_step=2, norm_topk_prob=False),
    ),
    "moe_mlp_only_normalised": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(
            MOE, mlp_only_layers=[0], norm_topk_prob=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
        ),
    ),
}
TOKENS = np.random.default_rng(1).integers(0, COMMON["vocab_size"], (2, 20))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{variant: directory} of tiny random HF checkpoints (norm weights randomised too), saved by transformers."""
    out = {}
    for i, (name, (config_cls, model_cls, extra)) in enumerate(VARIANTS.items()):
        torch.manual_seed(i)
        model = model_cls(config_cls(**{**COMMON, **extra})).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight"):
                    p.copy_(1 + 0.3 * torch.randn_like(p))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = path
    return out


def hf_outputs(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(TOKENS), output_router_logits=model.config.model_type == "qwen3_moe")
    aux = float(out.aux_loss) if getattr(out, "aux_loss", None) is not None else None
    return out.logits.numpy(), aux


@nnx.jit
def forward_with_aux(model, tokens):
    return model(tokens, return_aux=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_aux_loss_match_transformers(checkpoints, variant):
    model = qlx.load_hf(checkpoints[variant])
    logits, aux = forward_with_aux(model, jnp.asarray(TOKENS))
    ref_logits, ref_aux = hf_outputs(checkpoints[variant])
    assert logits.dtype == jnp.float32 and logits.shape == ref_logits.shape
    assert np.abs(np.asarray(logits) - ref_logits).max() <= 1e-4
    if ref_aux is None:
        assert float(aux["load_balancing_loss"]) == 0.0
    else:
        assert float(aux["load_balancing_loss"]) == pytest.approx(ref_aux, rel=1e-5)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v.startswith("moe")])
def test_recorded_routing_is_the_top_k_of_transformers_router(checkpoints, variant):
    """``hidden_states(return_routing=True)`` (what routing replay records and replays) holds, per MoE layer, the
    top-k experts of transformers' router logits for every token."""
    model = qlx.load_hf(checkpoints[variant])
    _, routing = model.hidden_states(jnp.asarray(TOKENS), return_routing=True)
    hf = AutoModelForCausalLM.from_pretrained(checkpoints[variant], dtype=torch.float32).eval()
    with torch.no_grad():
        router_logits = hf(torch.from_numpy(TOKENS), output_router_logits=True).router_logits
    moe_layers = [i for i in range(model.config.num_layers) if model.config.is_moe_layer(i)]
    assert routing.shape == (*TOKENS.shape, len(moe_layers), model.config.num_experts_per_tok)
    assert len(router_logits) == len(moe_layers)
    k = model.config.num_experts_per_tok
    for m, logits in enumerate(router_logits):
        want = torch.topk(logits.float(), k, dim=-1).indices.numpy().reshape(*TOKENS.shape, k)
        np.testing.assert_array_equal(np.asarray(routing[:, :, m]), want)


def test_config_mapping(checkpoints):
    dense = qlx.load_hf(checkpoints["dense_tied_yarn"]).config
    assert dense.family == "qwen3" and dense.tie_word_embeddings and dense.rope_scaling.factor == 4.0
    assert dense.rope_scaling.original_max_position_embeddings == 16
    moe = qlx.load_hf(checkpoints["moe_sparse_step2_unnormalised"]).config
    assert (moe.num_experts, moe.decoder_sparse_step, moe.norm_topk_prob) == (8, 2, False)
    assert [moe.is_moe_layer(i) for i in range(3)] == [False, True, False]


def test_save_hf_round_trip_through_transformers(checkpoints, tmp_path):
    """qlx -> save_hf (sharded) -> transformers gives qlx's logits; qlx reloads the same parameters."""
    model = qlx.load_hf(checkpoints["moe_mlp_only_normalised"])
    logits = np.asarray(forward_with_aux(model, jnp.asarray(TOKENS))[0])
    qlx.save_hf(model, tmp_path / "out", max_shard_bytes=16_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ref_logits, _ = hf_outputs(tmp_path / "out")
    assert np.abs(ref_logits - logits).max() <= 1e-4
    reloaded = qlx.load_hf(tmp_path / "out")
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(reloaded)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    with pytest.raises(CheckpointError, match="overwrite=True"):
        qlx.save_hf(model, tmp_path / "out")


def test_save_hf_split_over_processes_writes_each_shard_once(checkpoints, tmp_path, monkeypatch):
    """With P processes, process p writes shards p, p + P, ... (process 0 the index and config.json), and every one
    produces every tensor (the reads are collectives): the P outputs together are the one-process output, byte for
    byte. The processes are simulated one after another (jax.process_index / process_count patched)."""
    from qlx.models import hf

    model = qlx.load_hf(checkpoints["moe_mlp_only_normalised"])
    produced = {}
    real_to_host = hf.to_host
    monkeypatch.setattr(hf, "to_host", lambda a: produced.setdefault(run, []).append(a.shape) or real_to_host(a))
    run = "one"
    qlx.save_hf(model, tmp_path / run, max_shard_bytes=16_000)
    monkeypatch.setattr(hf.multihost_utils, "sync_global_devices", lambda name: None)
    monkeypatch.setattr(hf.jax, "process_count", lambda: 2)
    written = {}
    for rank in (0, 1):
        monkeypatch.setattr(hf.jax, "process_index", lambda rank=rank: rank)
        run = f"rank{rank}"
        qlx.save_hf(model, tmp_path / run, max_shard_bytes=16_000)
        written[rank] = sorted(p.name for p in (tmp_path / run).iterdir())
        assert produced[run] == produced["one"]  # the same reads (collectives with P processes) in the same order
    expected = sorted(p.name for p in (tmp_path / "one").iterdir())
    shards = sorted(n for n in expected if n.startswith("model-"))
    assert written[0] == sorted(["config.json", "model.safetensors.index.json", *shards[0::2]])
    assert written[1] == shards[1::2]
    for rank, names in written.items():
        for name in names:
            assert (tmp_path / f"rank{rank}" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_tied_round_trip_writes_no_lm_head(checkpoints, tmp_path):
    model = qlx.load_hf(checkpoints["dense_tied_yarn"])
    qlx.save_hf(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    ref_logits, _ = hf_outputs(tmp_path)
    assert np.abs(ref_logits - hf_outputs(checkpoints["dense_tied_yarn"])[0]).max() <= 1e-5


def test_load_onto_mesh_is_sharded_and_matches(checkpoints):
    mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
    model = qlx.load_hf(checkpoints["moe_mlp_only_normalised"], mesh=mesh)
    gate_up = model.layers[1].mlp.gate_up[...]
    assert gate_up.sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp", None, "tensor")
    assert gate_up.addressable_shards[0].data.shape == (4, 32, 2, 8)  # each shard holds matching gate / up columns
    assert model.layers[0].mlp.gate[...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    logits = np.asarray(forward_with_aux(model, jnp.asarray(TOKENS))[0])
    assert np.abs(logits - hf_outputs(checkpoints["moe_mlp_only_normalised"])[0]).max() <= 1e-4


def test_convert_cli_changes_dtype(checkpoints, tmp_path):
    source = checkpoints["moe_sparse_step2_unnormalised"]
    (source / "tokenizer.json").write_text("{}")
    assert qlx_main(["convert", "--hf", str(source), "--out-hf", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert (tmp_path / "bf16" / "tokenizer.json").exists()
    original = load_file(source / "model.safetensors")
    converted = load_file(tmp_path / "bf16" / "model.safetensors")
    assert converted.keys() == original.keys()
    for name, tensor in original.items():
        assert converted[name].dtype == torch.bfloat16
        torch.testing.assert_close(converted[name], tensor.to(torch.bfloat16), rtol=0, atol=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert model.config.dtype == torch.bfloat16
    assert qlx_main(["convert", "--hf", str(source), "--out-yaml", str(tmp_path / "m.yaml")]) == 0
    assert qlx.load_config(tmp_path / "m.yaml").model == qlx.load_hf(source).config


def _rewrite(source, destination, edit):
    shutil.copytree(source, destination)
    tensors = load_file(source / "model.safetensors")
    edit(tensors)
    save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    return destination


def test_checkpoint_errors_name_the_tensor(checkpoints, tmp_path):
    source = checkpoints["moe_sparse_step2_unnormalised"]
    missing = _rewrite(source, tmp_path / "missing", lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(
        CheckpointError,
        match=r"missing tensor model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight "
        r"\(expected shape \[16, 32\]\)",
    ):
        qlx.load_hf(missing)
    extra = _rewrite(source, tmp_path / "extra", lambda t: t.update({"model.layers.0.mlp.bias": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.mlp\.bias"):
        qlx.load_hf(extra)
    bad_shape = _rewrite(
        source, tmp_path / "shape", lambda t: t.update({"model.layers.2.self_attn.k_proj.weight": torch.zeros(8, 32)})
    )
    with pytest.raises(CheckpointError, match=r"k_proj\.weight .* shape \[8, 32\], expected \[16, 32\]"):
        qlx.load_hf(bad_shape)


def test_pickle_and_unsupported_checkpoints_are_refused(checkpoints, tmp_path):
    source = checkpoints["dense_tied_yarn"]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(source / "config.json", pickled / "config.json")
    torch.save(load_file(source / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        qlx.load_hf(pickled)
    for key, value, message in [
        ("architectures", ["LlamaForCausalLM"], "LlamaForCausalLM.*not supported"),
        ("attention_bias", True, "attention_bias"),
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}, "llama3"),
    ]:
        bad = tmp_path / key
        shutil.copytree(source, bad)
        config = json.loads((bad / "config.json").read_text())
        config[key] = value
        (bad / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=message):
            qlx.load_hf(bad)
    broken_index = tmp_path / "index"
    shutil.copytree(source, broken_index)
    (broken_index / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        qlx.load_hf(broken_index)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 32768,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "attention_factor": 1.3,
        },
    ],
)
def test_rope_frequencies_match_transformers(scaling):
    params = {"rope_type": "default", "rope_theta": 1e6} if scaling is None else {**scaling, "rope_theta": 1e6}
    hf = Qwen3Config(**{**COMMON, "head_dim": 64, "max_position_embeddings": 131072}, rope_parameters=params)
    if scaling is None:
        inv, want_scale = Qwen3RotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        inv, want_scale = ROPE_INIT_FUNCTIONS["yarn"](hf)
    want = inv.numpy()
    config = config_from_hf(hf.to_dict())
    inv_freq, scale = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    np.testing.assert_allclose(inv_freq, want, rtol=1e-6)
    assert scale == pytest.approx(want_scale, rel=1e-7)


def test_convert_cli_from_qlx_config(tmp_path):
    """`qlx convert --config` writes a freshly initialised checkpoint that transformers loads with the same weights."""
    config_path = Path(__file__).resolve().parents[1] / "configs/models/tiny-dense.yaml"
    args = ["convert", "--config", str(config_path), "--set", "model.num_layers=1", "--seed", "7"]
    assert qlx_main([*args, "--out-hf", str(tmp_path)]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.num_hidden_layers == 1 and model.config.tie_word_embeddings
    ours = qlx.load_hf(tmp_path)
    np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(), np.asarray(ours.embed[...]))
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(q, np.asarray(ours.layer_modules()[0].attn.q[...]).reshape(64, -1).T)
    assert qlx_main([*args, "--out-hf", str(tmp_path)]) == 2
