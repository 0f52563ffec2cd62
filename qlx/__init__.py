"""qlx: JAX-native long-context RL post-training for Qwen3 / Qwen3-MoE (the QwenLong-L1.5 recipe).

Public entry points are imported lazily so that ``import qlx`` stays cheap:

- ``qlx.load_config(path, overrides=())`` -- typed config from YAML with dotted overrides.
- ``qlx.load_hf(path, *, dtype="float32", mesh=None)`` -- model from a Hugging Face Qwen3 / Qwen3-MoE directory.
- ``qlx.save_hf(model, path)`` -- write a model back as a Hugging Face directory.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_config": "qlx.config",
    "Config": "qlx.config",
    "ConfigError": "qlx.config",
    "load_hf": "qlx.models.hf",
    "save_hf": "qlx.models.hf",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qlx' has no attribute {name!r}")
