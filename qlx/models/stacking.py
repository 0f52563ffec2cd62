"""Stacked decoder layers: building a stack of same-kind layers, slicing one layer out of it, and converting state
trees between the unrolled layout (``layers.{i}.…``) and the stacked one (``stacks.{r}.…`` [L_r, ...]).

A scanned model (``ModelConfig.scanned``) holds one stack per run of consecutive same-kind layers
(``ModelConfig.layer_runs``): run r covers layers [start_r, stop_r) and its parameters are the layers' parameters
stacked on a new leading axis with the logical name "layers" (unsharded in ``qlx.mesh.LOGICAL_AXIS_RULES``). Layer
i of run r is index i - start_r of every array of ``stacks.{r}``.

:func:`convert_layers` is a pure function over state trees (nested mappings, tuples and lists; leaves are arrays,
``jax.ShapeDtypeStruct`` or ``nnx.Variable``): every mapping holding ``layers`` becomes one holding ``stacks`` (or the
reverse), wherever it sits (parameters, and the Adam moments of an optimizer state, which mirror them). Checkpoint
restores use it to read a checkpoint written in the other layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qlx.config import ModelConfig

LAYER_AXIS = "layers"
UNROLLED_KEY = "layers"
STACKED_KEY = "stacks"


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module of the same structure whose every variable is the modules' variables stacked on axis 0, its
    ``out_sharding`` names prefixed with "layers". The modules must be of one kind (same graph)."""
    graphdefs, states = zip(*(nnx.split(m) for m in modules), strict=True)
    return nnx.merge(graphdefs[0], jax.tree.map(_stack_leaves, *states, is_leaf=_is_variable))


def layer_state(stack_state, index: int):
    """The state of layer ``index`` of a stack (static slice of every array; names keep their own axes)."""
    return jax.tree.map(lambda v: _unstack_leaf(v, index), stack_state, is_leaf=_is_variable)


def layer_location(config: ModelConfig, layer: int) -> tuple[int, int]:
    """(run r, index in the run) of decoder layer ``layer`` in a scanned model."""
    return _locate(config.layer_runs, layer)


def _locate(runs, layer: int) -> tuple[int, int]:
    for r, (start, stop) in enumerate(runs):
        if start <= layer < stop:
            return r, layer - start
    raise IndexError(f"layer {layer} outside [0, {runs[-1][1]})")


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _stack_spec(sharding, prefix: bool):
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec)
    return NamedSharding(sharding.mesh, PartitionSpec(None, *spec) if prefix else PartitionSpec(*spec[1:]))


def _stack_leaves(*leaves):
    first = leaves[0]
    if isinstance(first, nnx.Variable):
        names = first.get_metadata().get("out_sharding")
        value = _stack_leaves(*(v.get_value() for v in leaves))
        return first.replace(value, **({} if names is None else {"out_sharding": (LAYER_AXIS, *names)}))
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(
            (len(leaves), *first.shape), first.dtype, sharding=_stack_spec(first.sharding, prefix=True)
        )
    if isinstance(first, np.ndarray):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _unstack_leaf(leaf, index: int):
    if isinstance(leaf, nnx.Variable):
        names = leaf.get_metadata().get("out_sharding")
        value = _unstack_leaf(leaf.get_value(), index)
        return leaf.replace(value, **({} if names is None else {"out_sharding": tuple(names[1:])}))
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=_stack_spec(leaf.sharding, prefix=False))
    return leaf[index]


def _item(mapping: Mapping, index: int):
    """mapping[index] whether the tree uses int keys (nnx.State) or str keys (orbax metadata)."""
    return mapping[index] if index in mapping else mapping[str(index)]


def _key_like(mapping: Mapping, index: int):
    return str(index) if any(isinstance(k, str) for k in mapping) else index


def _convert_mapping(tree: Mapping, runs, scanned: bool) -> dict:
    out = {}
    for key, value in tree.items():
        if scanned and key == UNROLLED_KEY:
            out[STACKED_KEY] = {
                _key_like(value, r): jax.tree.map(
                    _stack_leaves, *(_item(value, i) for i in range(start, stop)), is_leaf=_is_variable
                )
                for r, (start, stop) in enumerate(runs)
            }
        elif not scanned and key == STACKED_KEY:
            layers = {}
            for i in range(runs[-1][1]):
                r, j = _locate(runs, i)
                layers[_key_like(value, i)] = layer_state(_item(value, r), j)
            out[UNROLLED_KEY] = layers
        else:
            out[key] = _convert(value, runs, scanned)
    return out


def convert_layers(tree, config: ModelConfig, *, scanned: bool):
    """``tree`` with its layer parameters in the stacked layout (``scanned=True``) or the unrolled one.

    Subtrees already in the asked layout pass through unchanged. nnx.State in, nnx.State out; other mappings come
    back as dicts, tuples (named tuples included) and lists as their own type. Leaves other than arrays,
    ShapeDtypeStructs and Variables (optimizer counters, None) are untouched."""
    return _convert(tree, config.layer_runs, scanned)


def _convert(tree, runs, scanned: bool):
    if isinstance(tree, nnx.State):
        return nnx.State(_convert_mapping(tree, runs, scanned))
    if isinstance(tree, Mapping):
        return _convert_mapping(tree, runs, scanned)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_convert(v, runs, scanned) for v in tree))
    if isinstance(tree, tuple | list):
        return type(tree)(_convert(v, runs, scanned) for v in tree)
    return tree


def _stacks(tree) -> Mapping | None:
    """The first ``stacks`` mapping inside ``tree`` (depth first), or None."""
    if isinstance(tree, Mapping):
        if STACKED_KEY in tree:
            return tree[STACKED_KEY]
        values = list(tree.values())
    elif isinstance(tree, tuple | list):
        values = list(tree)
    else:
        return None
    for value in values:
        found = _stacks(value)
        if found is not None:
            return found
    return None


def _runs_of(stacks: Mapping) -> tuple[tuple[int, int], ...]:
    """The layer runs of a stacked layout, from the leading dimension of each stack's arrays."""
    runs, start = [], 0
    for r in range(len(stacks)):
        leaf = jax.tree.leaves(_item(stacks, r), is_leaf=lambda x: hasattr(x, "shape"))[0]
        length = (leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf).shape[0]
        runs.append((start, start + length))
        start += length
    return tuple(runs)


def match_layout(tree, like):
    """``tree`` converted to the layer layout of ``like`` (both state trees: parameters, optimizer states, orbax
    metadata trees), the runs read from whichever of them is stacked; unchanged when the layouts agree or either
    holds no layers. The restore hook: ``match_layout(target, saved_metadata)`` is what to ask orbax for, and
    ``match_layout(restored, target)`` turns what it read into the target's layout."""
    scanned, want = tree_is_scanned(tree), tree_is_scanned(like)
    if scanned is None or want is None or scanned == want:
        return tree
    return _convert(tree, _runs_of(_stacks(like if want else tree)), want)


def tree_is_scanned(tree) -> bool | None:
    """True when ``tree`` holds a stacked layout somewhere, False when it holds an unrolled one, None for neither."""
    if isinstance(tree, Mapping):
        if STACKED_KEY in tree:
            return True
        if UNROLLED_KEY in tree:
            return False
        values = tree.values()
    elif isinstance(tree, tuple | list):
        values = tree
    else:
        return None
    for value in values:
        found = tree_is_scanned(value)
        if found is not None:
            return found
    return None
