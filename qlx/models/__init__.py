"""Qwen3 / Qwen3-MoE models in Flax NNX, their MoE and attention dispatch, KV cache, and Hugging Face import/export.

- ``build_model(config, *, seed=0, mesh=None)``: freshly initialised model, sharded at creation when a mesh is given.
- ``model(tokens_bt, *, positions_bt=None, segment_ids_bt=None, cache=None, return_aux=False)`` -> logits [B, T, V].
- ``model.hidden_states(...)``, ``model.lm_head_weight()``, ``model.init_cache(batch, max_len)``.
- ``state_shardings(state, mesh)``: NamedSharding tree of a model state; ``shard_model(model, mesh)``.
- ``load_hf(path, *, dtype="float32", mesh=None)`` / ``save_hf(model, path)``: Hugging Face checkpoints.
"""

from qlx.models.cache import KVCache
from qlx.models.hf import load_hf, save_hf
from qlx.models.qwen3 import Qwen3ForCausalLM, build_model, shard_model
from qlx.models.sharding import Layout, state_shardings

__all__ = [
    "KVCache",
    "Layout",
    "Qwen3ForCausalLM",
    "build_model",
    "load_hf",
    "save_hf",
    "shard_model",
    "state_shardings",
]
