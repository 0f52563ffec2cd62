"""Model merging: per-tensor methods with mergekit 0.1.x semantics and streamed Hugging Face checkpoint merges.

- ``merge_tensor(method, base, models, **params)``: one tensor (numpy or jax arrays); ``METHODS`` lists the methods.
- ``merge_checkpoints(base, models, out, method=..., **params)``: Qwen3 / Qwen3-MoE directories, one HF tensor at a
  time, resumable; ``qlx merge`` is its command line.
"""

from qlx.merge.checkpoint import merge_checkpoints
from qlx.merge.methods import METHODS, MergeError, MergeParams, merge_params, merge_tensor, topk_mask

__all__ = ["METHODS", "MergeError", "MergeParams", "merge_checkpoints", "merge_params", "merge_tensor", "topk_mask"]
