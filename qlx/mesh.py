"""Device mesh over the axes (data, fsdp, expert, tensor, seq) and the one table mapping logical axis names to them.

Parameters and activations name their dimensions logically (``("embed", "mlp")`` for an MLP weight,
``("batch", "length", "embed")`` for activations). :data:`LOGICAL_AXIS_RULES` maps each logical name to an ordered
list of candidate mesh axes; :func:`logical_to_spec` turns a tuple of logical names into a ``PartitionSpec``, taking
for each dimension the candidates not already used by an earlier dimension of the same array. So a weight
``("embed", "mlp")`` becomes ``P("fsdp", "tensor")``, while activations ``("batch", "length", "embed")`` become
``P(("data", "fsdp", "expert"), "seq", None)``: the batch already took ``fsdp``. The batch also takes ``expert``
(as MaxText's ``activation_batch`` does): attention and the dense layers split their tokens over the expert axis
instead of repeating the same work on every expert shard, and the MoE's shard_map (``qlx.models.moe_ep``) finds
the tokens already spread over ``expert``. A new layout is a rules change, not a code change (``mesh.rules`` in the
config overrides entries).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from qlx.config import MESH_AXES, MeshConfig

# logical name -> mesh axes it may be sharded over (in order; a dimension gets all candidates still unused).
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    # activations
    "batch": ("data", "fsdp", "expert"),
    "length": ("seq",),
    # parameters (and the matching activation dimensions)
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "experts": ("expert",),
    "layers": (),
    "norm": (),
}


def resolve_sizes(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill the one -1 size so the product equals ``num_devices``; check that the sizes multiply to it."""
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axis {unknown[0]!r}; valid axes: {', '.join(MESH_AXES)}")
    resolved = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    fills = [axis for axis, size in resolved.items() if size == -1]
    if len(fills) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {fills}")
    fixed = math.prod(size for size in resolved.values() if size != -1)
    if fills:
        if num_devices % fixed:
            raise ValueError(
                f"mesh.{fills[0]}=-1: the other axes multiply to {fixed}, which does not divide the "
                f"{num_devices} devices; choose sizes whose product divides {num_devices}"
            )
        resolved[fills[0]] = num_devices // fixed
    elif fixed != num_devices:
        shape = " x ".join(f"{axis}={size}" for axis, size in resolved.items())
        raise ValueError(f"mesh: {shape} needs {fixed} devices but {num_devices} are available; set one axis to -1")
    return resolved


def make_mesh(config: MeshConfig | Mapping[str, int] | None = None, *, devices: Sequence | None = None) -> Mesh:
    """A ``jax.sharding.Mesh`` with axes (data, fsdp, expert, tensor, seq).

    Args:
      config: a MeshConfig, or a mapping of axis -> size (missing axes are 1); one size may be -1 to take the
        remaining devices. None puts every device on ``fsdp``.
      devices: devices to use (default: all of ``jax.devices()``).
    """
    devices = list(jax.devices() if devices is None else devices)
    if config is None:
        sizes = {"fsdp": -1}
    elif isinstance(config, MeshConfig):
        sizes = config.sizes()
    else:
        sizes = dict(config)
    resolved = resolve_sizes(sizes, len(devices))
    shape = tuple(resolved[axis] for axis in MESH_AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_rules(overrides: Mapping[str, object] | None = None) -> dict[str, tuple[str, ...]]:
    """The rules table with ``overrides`` ({logical: mesh_axis | [mesh_axes] | None}) applied."""
    rules = dict(LOGICAL_AXIS_RULES)
    for logical, target in (overrides or {}).items():
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        bad = [axis for axis in axes if axis not in MESH_AXES]
        if bad:
            raise ValueError(f"mesh.rules.{logical}: unknown mesh axis {bad[0]!r}; valid axes: {', '.join(MESH_AXES)}")
        rules[logical] = axes
    return rules


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, an axis name, or a tuple of names) as a tuple."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Mapping[str, tuple[str, ...]] | None = None):
    """``("embed", "mlp")`` -> ``PartitionSpec("fsdp", "tensor")``; a mesh axis is used at most once per array."""
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule; known logical axes: {', '.join(sorted(rules))}")
        axes = tuple(axis for axis in rules[name] if axis not in used)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None], rules=None) -> NamedSharding:
    """The NamedSharding of an array whose dimensions carry ``logical_axes``."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules))
