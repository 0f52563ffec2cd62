"""Rematerialisation policies of a decoder layer, named as MaxText names them (``ModelConfig.remat``).

The layer tags its projection outputs with ``jax.ad_checkpoint.checkpoint_name``; a policy says which tagged values
the backward pass keeps (on device, or offloaded to host memory) and which it recomputes from the layer input:

  query_proj / key_proj / value_proj: q, k, v after their projections [B, T, H | KV, K]
  context: the attention output before the output projection [B, T, H, K]
  out_proj: the attention block output [B, T, D]
  mlpwi_0 / mlpwi_1: the dense MLP's gate and up projections [B, T, I]
  mlpwo: the MLP (dense or MoE) block output [B, T, D]

"none" is no checkpointing at all; "full" keeps only the layer input; "minimal" keeps every weight matmul output
(``checkpoint_dots_with_no_batch_dims``; attention's batched score and value matmuls are recomputed). The
``*_offloaded`` policies move what they keep to the ``pinned_host`` memory space (the device's host memory).
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

from qlx.config import REMAT_POLICIES

QKV = ("query_proj", "key_proj", "value_proj")
_SAVED_NAMES = {
    "save_dot_with_context_except_mlp": (*QKV, "context", "out_proj"),
    "save_dot_except_mlpwi": (*QKV, "out_proj", "mlpwo"),
    "save_dot_except_mlp": (*QKV, "out_proj"),
    "save_qkv_proj": QKV,
    "save_out_proj": ("out_proj",),
}
HOST_MEMORY = "pinned_host"

__all__ = ["REMAT_POLICIES", "checkpoint_name", "remat_policy", "remat"]


def _has_host_memory() -> bool:
    return any(m.kind == HOST_MEMORY for m in jax.devices()[0].addressable_memories())


def remat_policy(name: str):
    """The ``jax.checkpoint`` policy of ``name`` (None for "full": save nothing). "none" is not a policy (no
    checkpointing); ValueError for it, for unknown names, and for offloading on a backend without host memory."""
    if name not in REMAT_POLICIES or name == "none":
        raise ValueError(f"model.remat: {name!r} is not a checkpoint policy; valid: {', '.join(REMAT_POLICIES[1:])}")
    cp = jax.checkpoint_policies
    if name.endswith("_offloaded") and not _has_host_memory():
        raise ValueError(
            f"model.remat={name!r} offloads to {HOST_MEMORY!r} memory, which the {jax.default_backend()} backend "
            "does not have; choose a policy without offloading"
        )
    if name == "full":
        return None
    if name == "minimal":
        return cp.checkpoint_dots_with_no_batch_dims
    if name == "minimal_with_context":
        return cp.save_from_both_policies(cp.checkpoint_dots_with_no_batch_dims, cp.save_only_these_names("context"))
    if name == "qkv_proj_offloaded":
        return cp.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=list(QKV),
            offload_src="device",
            offload_dst=HOST_MEMORY,
        )
    if name == "minimal_offloaded":
        return cp.offload_dot_with_no_batch_dims(offload_src="device", offload_dst=HOST_MEMORY)
    return cp.save_only_these_names(*_SAVED_NAMES[name])


def remat(fn, name: str, *, scanned: bool):
    """``fn`` checkpointed with the policy ``name`` (``fn`` itself for "none").

    CSE is prevented only for unrolled layers: inside ``lax.scan`` it cannot merge the recomputation into the
    forward, and the barrier would cost performance (as MaxText and ``jax.checkpoint``'s documentation do)."""
    if name == "none":
        return fn
    return jax.checkpoint(fn, policy=remat_policy(name), prevent_cse=not scanned)
