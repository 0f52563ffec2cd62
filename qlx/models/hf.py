"""Hugging Face checkpoints: ``load_hf`` (config.json + safetensors shards -> model) and ``save_hf`` (the reverse).

Supported architectures: ``Qwen3ForCausalLM`` and ``Qwen3MoeForCausalLM``. Weights are read tensor by tensor from
memory-mapped safetensors files (one file, or shards listed in ``model.safetensors.index.json``) and placed straight
into their final (sharded, with a mesh) layout with ``jax.make_array_from_callback``: each device's block is filled
from the tensors (or parts of tensors) that fall inside it, so a device reads only its slice and the host holds one
device block at a time, never a whole stacked parameter (stacked experts, gate and up halves of the fused
``gate_up``, and the layer stacks of a scanned model). Pickle checkpoints (.bin / .pt) are refused. A scanned model
(``scan_layers``) maps layer i of run r to index i - start_r of ``stacks.{r}.…``; ``save_hf`` writes it one layer at
a time.

Name mapping (HF -> qlx; HF linear weights are [out, in], ours [in, out]):
  model.embed_tokens.weight -> embed               lm_head.weight -> lm_head (transposed; absent when tied)
  model.norm.weight -> final_norm.scale            model.layers.{i}.{input,post_attention}_layernorm.weight
  self_attn.{q,k,v}_proj.weight [H*K, D] -> attn.{q,k,v} [D, H, K]   self_attn.o_proj.weight -> attn.o [H, K, D]
  self_attn.{q,k}_norm.weight -> attn.{q,k}_norm.scale               mlp.{gate,up,down}_proj.weight -> mlp.*
  mlp.gate.weight [E, D] -> moe.router [D, E]      mlp.experts.{e}.down_proj.weight -> moe.down[e]
  mlp.experts.{e}.gate_proj.weight -> moe.gate_up[e, :, 0]     mlp.experts.{e}.up_proj.weight -> moe.gate_up[e, :, 1]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from qlx.config import ConfigError, ModelConfig, RopeScalingConfig
from qlx.distributed import to_host
from qlx.models.qwen3 import Qwen3ForCausalLM
from qlx.models.safetensors_io import DTYPES, Reader, TensorInfo, TensorToWrite, read_header, write_file
from qlx.models.sharding import Layout, state_shardings
from qlx.models.stacking import layer_location

ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe"}
MODEL_TYPES = {family: arch for arch, family in ARCHITECTURES.items()}
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
ALL = slice(None)


class CheckpointError(ValueError):
    """A checkpoint directory cannot be loaded; the message names the file, key or tensor."""


# --------------------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


_INT_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "intermediate_size", "num_experts", "num_local_experts", "num_experts_per_tok",
    "moe_intermediate_size", "decoder_sparse_step",
)  # fmt: skip
_FLOAT_KEYS = ("rms_norm_eps", "initializer_range", "router_aux_loss_coef", "rope_theta")
_MAPPING_KEYS = ("rope_parameters", "rope_scaling")


def _check_value_types(hf: dict, source: str) -> None:
    """CheckpointError naming the first ``config.json`` key whose value has the wrong JSON type (null is left to
    the key's default)."""

    def bad(key, want):
        return CheckpointError(f"{source}: {key}: expected {want}, got {hf[key]!r}")

    for key in _INT_KEYS:
        if hf.get(key) is not None and (isinstance(hf[key], bool) or not isinstance(hf[key], int)):
            raise bad(key, "an integer")
    for key in _FLOAT_KEYS:
        if hf.get(key) is not None and (isinstance(hf[key], bool) or not isinstance(hf[key], int | float)):
            raise bad(key, "a number")
    for key in _MAPPING_KEYS:
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise bad(key, "an object")
    if hf.get("architectures") is not None and not isinstance(hf["architectures"], list):
        raise bad("architectures", "a list of class names")
    layers = hf.get("mlp_only_layers")
    if layers is not None and not (isinstance(layers, list) and all(type(i) is int for i in layers)):
        raise bad("mlp_only_layers", "a list of layer indices")


def _rope_from_hf(hf: dict, source: str) -> tuple[float, RopeScalingConfig | None]:
    """(rope_theta, YaRN scaling or None) from either transformers 5 ``rope_parameters`` or legacy keys."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = {**legacy, **params}
    scaling.pop("rope_theta", None)
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise CheckpointError(f"{source}: rope type {kind!r} is not supported; qlx supports default RoPE and 'yarn'")
    for key in ("mscale", "mscale_all_dim"):
        if scaling.get(key):
            raise CheckpointError(f"{source}: rope_scaling.{key} (DeepSeek-style YaRN) is not supported")
    if scaling.pop("truncate", True) is not True:
        raise CheckpointError(f"{source}: rope_scaling.truncate=false is not supported")
    original = int(scaling.pop("original_max_position_embeddings", hf.get("max_position_embeddings")))
    factor = scaling.pop("factor", None)
    factor = float(hf["max_position_embeddings"] / original if factor is None else factor)
    known = {"beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "partial_rotary_factor"}
    unknown = sorted(set(scaling) - known)
    if unknown:
        raise CheckpointError(f"{source}: rope_scaling.{unknown[0]} is not supported")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{source}: rope partial_rotary_factor != 1 is not supported")
    return theta, RopeScalingConfig(
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(scaling.get("beta_fast") or 32.0),
        beta_slow=float(scaling.get("beta_slow") or 1.0),
        attention_factor=None if scaling.get("attention_factor") is None else float(scaling["attention_factor"]),
    )


def config_from_hf(hf: dict, *, dtype: str = "float32", source: str = "config.json") -> ModelConfig:
    """ModelConfig from a Hugging Face Qwen3 / Qwen3-MoE ``config.json`` mapping; unsupported features are refused."""
    _check_value_types(hf, source)
    architectures = hf.get("architectures") or [MODEL_TYPES.get(hf.get("model_type"), str(hf.get("model_type")))]
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
        raise CheckpointError(
            f"{source}: architecture {architectures} (model_type {hf.get('model_type')!r}) is not supported; "
            f"qlx loads {' and '.join(ARCHITECTURES)}"
        )
    family = ARCHITECTURES[architectures[0]]

    def need(key, *aliases):
        for k in (key, *aliases):
            if k in hf:
                return hf[k]
        raise CheckpointError(f"{source}: missing key {key!r}")

    refusals = {
        "attention_bias": (hf.get("attention_bias", False), "attention biases"),
        "use_sliding_window": (hf.get("use_sliding_window", False), "sliding-window attention"),
        "hidden_act": (hf.get("hidden_act", "silu") != "silu", f"activation {hf.get('hidden_act')!r} (only silu)"),
        "layer_types": (
            any(t != "full_attention" for t in hf.get("layer_types") or []),
            "layer types other than full_attention",
        ),
    }
    for key, (bad, what) in refusals.items():
        if bad:
            raise CheckpointError(f"{source}: {key}: {what} not supported")
    theta, scaling = _rope_from_hf(hf, source)
    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    fields = dict(
        family=family,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        dtype=dtype,
        param_dtype=dtype,
    )
    if family == "qwen3":
        fields.update(intermediate_size=int(need("intermediate_size")))
    else:
        fields.update(
            intermediate_size=int(hf.get("intermediate_size", 0)),
            num_experts=int(need("num_experts", "num_local_experts")),
            num_experts_per_tok=int(need("num_experts_per_tok")),
            moe_intermediate_size=int(need("moe_intermediate_size")),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()),
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)) if hf.get("output_router_logits") else 0.0,
        )
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise CheckpointError(f"{source}: inconsistent config: {e}") from None


def config_to_hf(config: ModelConfig) -> dict:
    """The ``config.json`` mapping transformers reads for ``config`` (legacy rope keys, read by 4.x and 5.x)."""
    c = config
    rope_scaling = None
    if c.rope_scaling is not None:
        s = c.rope_scaling
        rope_scaling = {
            "rope_type": "yarn",
            "factor": s.factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
            "beta_fast": s.beta_fast,
            "beta_slow": s.beta_slow,
        }
        if s.attention_factor is not None:
            rope_scaling["attention_factor"] = s.attention_factor
    hf = {
        "architectures": [MODEL_TYPES[c.family]],
        "model_type": c.family,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "initializer_range": c.initializer_range,
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "use_cache": True,
        "dtype": c.param_dtype,
    }
    if c.family == "qwen3_moe":
        hf.update(
            num_experts=c.num_experts,
            num_experts_per_tok=c.num_experts_per_tok,
            moe_intermediate_size=c.moe_intermediate_size,
            norm_topk_prob=c.norm_topk_prob,
            decoder_sparse_step=c.decoder_sparse_step,
            mlp_only_layers=list(c.mlp_only_layers),
            router_aux_loss_coef=c.router_aux_loss_coef,
            output_router_logits=c.router_aux_loss_coef > 0,
        )
    return hf


# --------------------------------------------------------------------------------------------------------------------
# tensor names <-> parameter paths


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor: its name, the qlx parameter path, the qlx shape of its part of the parameter, the layout
    transform ("copy", "transpose", "in_heads" [H*K, D] <-> [D, H, K], "out_heads" [D, H*K] <-> [H, K, D]) and
    ``index``, the numpy index of that part in the parameter (``()``: all of it; ``(e,)``: expert e of a stacked
    weight; ``(e, slice(None), 0)``: expert e's gate half of the fused ``gate_up`` [E, D, 2, I]). ``stacked``: the
    parameter is a layer stack and ``index[0]`` is the layer's place in it."""

    name: str
    path: tuple
    shape: tuple[int, ...]
    transform: str
    index: tuple = ()
    stacked: bool = False

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.transform == "copy":
            return self.shape
        if self.transform == "transpose":
            return self.shape[::-1]
        if self.transform == "in_heads":
            return (self.shape[1] * self.shape[2], self.shape[0])
        return (self.shape[2], self.shape[0] * self.shape[1])

    def to_qlx(self, hf_array: np.ndarray) -> np.ndarray:
        """The qlx layout of ``hf_array`` as a view (no copy: slicing it reads only the slice)."""
        if self.transform == "copy":
            return hf_array
        if self.transform == "transpose":
            return hf_array.T
        if self.transform == "in_heads":
            return hf_array.reshape(self.shape[1], self.shape[2], self.shape[0]).transpose(2, 0, 1)
        return hf_array.reshape(self.shape[2], self.shape[0], self.shape[1]).transpose(1, 2, 0)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        if self.transform == "copy":
            return array
        if self.transform == "transpose":
            return array.T
        if self.transform == "in_heads":
            return array.reshape(self.shape[0], -1).T
        return array.reshape(-1, self.shape[2]).T


def _in_stack(spec: TensorSpec, config: ModelConfig) -> TensorSpec:
    """A layer tensor's spec for a scanned model: ``layers.{i}.…`` -> ``stacks.{r}.…`` at index (i - start_r, ...)."""
    if spec.path[0] != "layers":
        return spec
    r, j = layer_location(config, spec.path[1])
    return dataclasses.replace(spec, path=("stacks", r, *spec.path[2:]), index=(j, *spec.index), stacked=True)


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the HF checkpoint for ``config``, in the order Hugging Face lists them (parameter paths of
    the scanned layout when ``config.scanned``)."""
    specs = _unrolled_specs(config)
    return [_in_stack(s, config) for s in specs] if config.scanned else specs


def _unrolled_specs(config: ModelConfig) -> list[TensorSpec]:
    c = config
    d, h, kv, k = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    specs = [TensorSpec("model.embed_tokens.weight", ("embed",), (c.vocab_size, d), "copy")]
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        layer = ("layers", i)
        specs += [
            TensorSpec(p + "input_layernorm.weight", (*layer, "input_norm", "scale"), (d,), "copy"),
            TensorSpec(p + "self_attn.q_proj.weight", (*layer, "attn", "q"), (d, h, k), "in_heads"),
            TensorSpec(p + "self_attn.k_proj.weight", (*layer, "attn", "k"), (d, kv, k), "in_heads"),
            TensorSpec(p + "self_attn.v_proj.weight", (*layer, "attn", "v"), (d, kv, k), "in_heads"),
            TensorSpec(p + "self_attn.o_proj.weight", (*layer, "attn", "o"), (h, k, d), "out_heads"),
            TensorSpec(p + "self_attn.q_norm.weight", (*layer, "attn", "q_norm", "scale"), (k,), "copy"),
            TensorSpec(p + "self_attn.k_norm.weight", (*layer, "attn", "k_norm", "scale"), (k,), "copy"),
            TensorSpec(p + "post_attention_layernorm.weight", (*layer, "post_attn_norm", "scale"), (d,), "copy"),
        ]
        if c.is_moe_layer(i):
            mi = c.moe_intermediate_size
            specs.append(TensorSpec(p + "mlp.gate.weight", (*layer, "mlp", "router"), (d, c.num_experts), "transpose"))
            for e in range(c.num_experts):
                q = f"{p}mlp.experts.{e}."
                specs += [
                    TensorSpec(q + "gate_proj.weight", (*layer, "mlp", "gate_up"), (d, mi), "transpose", (e, ALL, 0)),
                    TensorSpec(q + "up_proj.weight", (*layer, "mlp", "gate_up"), (d, mi), "transpose", (e, ALL, 1)),
                    TensorSpec(q + "down_proj.weight", (*layer, "mlp", "down"), (mi, d), "transpose", (e,)),
                ]
        else:
            mi = c.intermediate_size
            specs += [
                TensorSpec(p + "mlp.gate_proj.weight", (*layer, "mlp", "gate"), (d, mi), "transpose"),
                TensorSpec(p + "mlp.up_proj.weight", (*layer, "mlp", "up"), (d, mi), "transpose"),
                TensorSpec(p + "mlp.down_proj.weight", (*layer, "mlp", "down"), (mi, d), "transpose"),
            ]
    specs.append(TensorSpec("model.norm.weight", ("final_norm", "scale"), (d,), "copy"))
    if not c.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head",), (d, c.vocab_size), "transpose"))
    return specs


# --------------------------------------------------------------------------------------------------------------------
# load


def read_json(path: Path) -> dict:
    """A JSON file holding an object, as a dict; CheckpointError naming the file when missing, unreadable, not UTF-8,
    not JSON or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text: {e.reason} at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def tensor_index(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint in ``directory`` (single ``model.safetensors`` or an indexed set of shards)."""
    index_path = directory / INDEX_FILE
    if index_path.exists():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: missing 'weight_map'")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        weight_map = None
    if not files:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{directory}: only pickle checkpoints found ({', '.join(pickles)}); qlx loads safetensors only "
                "(pickle can run arbitrary code); convert them to safetensors first"
            )
        raise CheckpointError(f"{directory}: no model.safetensors or {INDEX_FILE} found")
    infos: dict[str, TensorInfo] = {}
    for name in files:
        file = directory / name
        if not file.exists():
            raise CheckpointError(f"{index_path}: lists shard {name}, which does not exist")
        for tensor, info in read_header(file).items():
            if tensor in infos:
                raise CheckpointError(f"tensor {tensor} appears in both {infos[tensor].file.name} and {name}")
            infos[tensor] = info
    if weight_map is not None:
        for tensor, name in weight_map.items():
            if tensor not in infos or infos[tensor].file.name != name:
                raise CheckpointError(f"{index_path}: tensor {tensor} is mapped to {name} but is not stored there")
    return infos


def check_tensors(specs: list[TensorSpec], infos: dict[str, TensorInfo], config: ModelConfig, reader: Reader) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped tensor.

    With tied embeddings a stored ``lm_head.weight`` is accepted only if it equals the embedding.
    """
    expected = {s.name: s for s in specs}
    missing = [name for name in expected if name not in infos]
    if missing:
        s = expected[missing[0]]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {s.name} (expected shape {list(s.hf_shape)}){more}")
    allowed_extra = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(name for name in infos if name not in expected and name not in allowed_extra)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"unexpected tensor {unexpected[0]} in {infos[unexpected[0]].file.name}{more}")
    for s in specs:
        info = infos[s.name]
        if info.shape != s.hf_shape:
            raise CheckpointError(
                f"tensor {s.name} in {info.file.name} has shape {list(info.shape)}, expected {list(s.hf_shape)}"
            )
        if not np.issubdtype(DTYPES[info.dtype], np.floating) and info.dtype != "BF16":
            raise CheckpointError(f"tensor {s.name} in {info.file.name} has non-float dtype {info.dtype}")
    tied_copy = config.tie_word_embeddings and "lm_head.weight" in infos
    if tied_copy and not np.array_equal(
        reader.get(infos["lm_head.weight"]), reader.get(infos["model.embed_tokens.weight"])
    ):
        raise CheckpointError("lm_head.weight differs from model.embed_tokens.weight but tie_word_embeddings=true")


def _read_block(group: list[TensorSpec], infos, reader: Reader, shape, index, np_dtype) -> np.ndarray:
    """The part ``index`` (a tuple of slices, as ``jax.make_array_from_callback`` gives) of a parameter of ``shape``
    made of the tensors ``group``: each tensor that falls inside it is read (only its part inside) and placed."""
    bounds = [s.indices(n)[:2] for s, n in zip(index, shape, strict=True)]
    block = np.empty(tuple(stop - start for start, stop in bounds), np_dtype)
    for spec in group:
        where = spec.index + (ALL,) * (len(shape) - len(spec.index))
        dest, src = [], []
        for at, (start, stop) in zip(where, bounds, strict=True):
            if isinstance(at, int):
                if not start <= at < stop:
                    break
                dest.append(at - start)
            else:
                dest.append(ALL)
                src.append(slice(start, stop))
        else:
            block[tuple(dest)] = spec.to_qlx(reader.get(infos[spec.name]))[tuple(src)]
    return block


def load_hf(path, *, dtype: str = "float32", mesh=None, rules=None, scan_layers="auto") -> Qwen3ForCausalLM:
    """Load a Hugging Face Qwen3 / Qwen3-MoE directory into a model; ``model(tokens)`` -> logits [B, T, V].

    dtype: parameter and compute dtype ("float32" or "bfloat16"). mesh: place each parameter straight into its
    sharded layout on this mesh (logical-axis ``rules`` optional); None puts the model on the default device.
    scan_layers: ``ModelConfig.scan_layers`` of the model ("auto": scanned when its layers are uniform).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config = config_from_hf(read_json(directory / "config.json"), dtype=dtype, source=str(directory / "config.json"))
    config = dataclasses.replace(config, scan_layers=scan_layers)
    infos = tensor_index(directory)
    specs = tensor_specs(config)
    reader = Reader()
    check_tensors(specs, infos, config, reader)
    layout = Layout.create(mesh, rules)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3ForCausalLM(config, rngs=nnx.Rngs(0), layout=layout)))
    shardings = state_shardings(abstract, mesh, rules) if mesh is not None else None
    by_path: dict[tuple, list[TensorSpec]] = {}
    for s in specs:
        by_path.setdefault(s.path, []).append(s)
    np_dtype = np.dtype(jnp.dtype(dtype))
    flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    loaded = []
    for param_path, var in tqdm(list(nnx.to_flat_state(abstract)), desc="load_hf", unit="param", disable=None):
        group = by_path.get(tuple(param_path))
        if group is None:
            raise CheckpointError(f"internal: parameter {'.'.join(map(str, param_path))} has no Hugging Face tensor")
        shape = var.get_value().shape
        read = functools.partial(_read_block, group, infos, reader, shape, np_dtype=np_dtype)
        if mesh is None:
            array = jax.device_put(read((ALL,) * len(shape)))
        else:
            array = jax.make_array_from_callback(shape, flat_shardings[param_path].get_value(), read)
        loaded.append((param_path, var.replace(array)))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


# --------------------------------------------------------------------------------------------------------------------
# save / convert


def _prepare_output(directory: Path, overwrite: bool) -> None:
    """Create ``directory``, refusing (every process) or removing (process 0) the weights already in it; with several
    processes they meet before and after the removal, so none sees a half-emptied folder."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(directory.glob("*.safetensors")) + sorted(directory.glob(INDEX_FILE))
    if existing and not overwrite:
        raise CheckpointError(f"{directory}: already holds {existing[0].name}; pass overwrite=True to replace it")
    _barrier("save_hf: checked the output folder")
    if jax.process_index() == 0:
        for file in existing:
            file.unlink()
    _barrier("save_hf: emptied the output folder")


def _barrier(name: str) -> None:
    """All processes of a multi-process job meet here (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def plan_shards(tensors: list[TensorToWrite], max_shard_bytes: int) -> list[tuple[str, list[TensorToWrite]]]:
    """``tensors`` in order, grouped into shards of at most ``max_shard_bytes`` (one tensor may exceed it alone), with
    their file names: a single shard is ``model.safetensors``, several are ``model-0000i-of-0000n.safetensors``."""
    shards: list[list[TensorToWrite]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return list(zip(names, shards, strict=True))


def write_index(directory: Path, plan: list[tuple[str, list[TensorToWrite]]]) -> None:
    """``model.safetensors.index.json`` for a sharded ``plan`` (nothing for a single shard)."""
    if len(plan) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for _, shard in plan for t in shard)},
            "weight_map": {t.name: name for name, shard in plan for t in shard},
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_shards(directory: Path, tensors: list[TensorToWrite], max_shard_bytes: int) -> list[str]:
    """Write ``tensors`` in order into the shards of :func:`plan_shards`, plus the index when sharded.

    With P processes (a multi-host job, writing to a folder they share) process p writes shards p, p + P, ... and
    process 0 the index; every process still produces every tensor, in order, because reading a parameter that is
    sharded across processes is a collective all of them take part in (:func:`qlx.distributed.to_host`). A process
    holds one tensor at a time, never a full copy of the model."""
    plan = plan_shards(tensors, max_shard_bytes)
    rank, count = jax.process_index(), jax.process_count()
    for i, (name, shard) in enumerate(tqdm(plan, desc="write", unit="shard", disable=None if rank == 0 else True)):
        if i % count == rank:
            write_file(directory / name, shard)
        else:
            for t in shard:
                t.produce()
    if rank == 0:
        write_index(directory, plan)
    _barrier("save_hf: wrote every shard")
    return [name for name, _ in plan]


def save_hf(
    model: Qwen3ForCausalLM,
    path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_config: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a Hugging Face directory: config.json and safetensors shards (+ index when sharded).

    Tensors are pulled from the devices and written one parameter at a time. ``extra_config`` adds keys to
    config.json (e.g. bos/eos token ids). An existing checkpoint in ``path`` is replaced only with ``overwrite``.
    A model on a multi-process mesh is written by all processes together (call it on every one; ``path`` on a
    filesystem they share): each writes its share of the shards, none gathers the whole model.
    """
    directory = Path(path)
    _prepare_output(directory, overwrite)
    hf_config = {**config_to_hf(model.config), **(extra_config or {})}
    if jax.process_index() == 0:
        (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
    current: dict[tuple, np.ndarray] = {}

    def producer(spec: TensorSpec):
        def produce():  # one parameter (one layer of a stacked one) on the host at a time
            key, index = (spec.path + spec.index[:1], spec.index[1:]) if spec.stacked else (spec.path, spec.index)
            if key not in current:
                current.clear()
                value = flat[spec.path].get_value()
                current[key] = to_host(value[spec.index[0]] if spec.stacked else value)
            value = current[key][index]
            return np.ascontiguousarray(spec.to_hf(value))

        return produce

    tensors = [
        TensorToWrite(spec.name, np.dtype(flat[spec.path].get_value().dtype), spec.hf_shape, producer(spec))
        for spec in tensor_specs(model.config)
    ]
    _write_shards(directory, tensors, max_shard_bytes)
    return directory


def convert_hf(
    source,
    destination,
    *,
    dtype: str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Re-write a Hugging Face Qwen3 / Qwen3-MoE checkpoint in ``dtype``, streaming tensor by tensor.

    The source is validated like ``load_hf`` (architecture, tensor names and shapes); config.json is copied with its
    dtype changed, and tokenizer / generation files are copied alongside.
    """
    source, directory = Path(source), Path(destination)
    if source.resolve() == directory.resolve():
        raise CheckpointError(f"{directory}: destination must differ from the source")
    hf_config = read_json(source / "config.json")
    config = config_from_hf(hf_config, dtype=dtype, source=str(source / "config.json"))
    infos = tensor_index(source)
    specs = tensor_specs(config)
    reader = Reader()
    check_tensors(specs, infos, config, reader)
    _prepare_output(directory, overwrite)
    np_dtype = np.dtype(jnp.dtype(dtype))
    tensors = [
        TensorToWrite(s.name, np_dtype, s.hf_shape, lambda info=infos[s.name]: reader.get(info).astype(np_dtype))
        for s in specs
    ]
    _write_shards(directory, tensors, max_shard_bytes)
    out_config = {**hf_config, "dtype": dtype}
    if "torch_dtype" in hf_config:
        out_config["torch_dtype"] = dtype
    (directory / "config.json").write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n")
    for file in sorted(source.iterdir()):
        skip = file.suffix in (".safetensors", *PICKLE_SUFFIXES) or file.name in ("config.json", INDEX_FILE)
        if file.is_file() and not skip:
            shutil.copy2(file, directory / file.name)
    return directory
