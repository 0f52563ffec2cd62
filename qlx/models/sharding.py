"""Logical-axis sharding for model parameters and activations.

Parameters are ``nnx.Param`` values whose ``out_sharding`` metadata holds logical axis names (``("embed", "mlp")``);
activations are constrained inside the forward with the same names. Both go through :func:`spec_for`, which applies
the one rules table (``qlx.mesh.LOGICAL_AXIS_RULES`` plus ``mesh.rules`` overrides) and then drops any mesh axis
that does not divide the dimension (a 4-kv-head weight on ``tensor=8`` stays replicated over ``tensor``; a batch of
1 in decode stays replicated over ``data``), so a layout never fails on a small or odd shape.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qlx.mesh import LOGICAL_AXIS_RULES, logical_to_spec, spec_axes


def spec_for(
    shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh, rules: Mapping | None = None
) -> PartitionSpec:
    """PartitionSpec of an array of ``shape`` whose dimensions carry ``logical_axes``, divisible on ``mesh``.

    ``logical_to_spec`` picks the mesh axes; each dimension then keeps, in order, the axes whose running product
    still divides its size.
    """
    if len(shape) != len(logical_axes):
        raise ValueError(
            f"shape {tuple(shape)} has {len(shape)} dimensions but logical axes {logical_axes} name {len(logical_axes)}"
        )
    spec = logical_to_spec(logical_axes, rules)
    entries = []
    for size, entry in zip(shape, spec, strict=True):
        axes = spec_axes(entry)
        kept: list[str] = []
        for axis in axes:
            if size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]) == 0:
                kept.append(axis)
        entries.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*entries)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a model's arrays live: the mesh (None: one device, no constraints) and the logical-axis rules.

    Hashable (rules are stored as sorted item tuples), so it can sit in a module's static graph definition.
    """

    mesh: Mesh | None = None
    rules: tuple[tuple[str, tuple[str, ...]], ...] = tuple(sorted(LOGICAL_AXIS_RULES.items()))

    @classmethod
    def create(cls, mesh: Mesh | None = None, rules: Mapping[str, tuple[str, ...]] | None = None) -> Layout:
        return cls(mesh, tuple(sorted((LOGICAL_AXIS_RULES if rules is None else rules).items())))

    def sharding(self, shape: Sequence[int], logical_axes: Sequence[str | None]) -> NamedSharding:
        """NamedSharding of an array of ``shape`` with ``logical_axes`` (requires a mesh)."""
        if self.mesh is None:
            raise ValueError("Layout.sharding needs a mesh; this layout has none")
        return NamedSharding(self.mesh, spec_for(shape, logical_axes, self.mesh, dict(self.rules)))

    def constrain(self, x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
        """``with_sharding_constraint`` by logical names; the identity without a mesh."""
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, self.sharding(x.shape, logical_axes))


def state_shardings(state, mesh: Mesh, rules: Mapping | None = None):
    """The NamedSharding tree of an ``nnx.State`` (or abstract state, or module) on ``mesh``.

    Each ``nnx.Variable`` is replaced by a copy holding its NamedSharding, the form ``jax.jit(out_shardings=...)``
    and ``jax.device_put`` accept for a State. A Variable without ``out_sharding`` metadata is replicated.
    """
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    layout = Layout.create(mesh, rules)

    def one(var):
        shape = var.get_value().shape
        names = var.get_metadata().get("out_sharding") or (None,) * len(shape)
        return var.replace(layout.sharding(shape, names))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
