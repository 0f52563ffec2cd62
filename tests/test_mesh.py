"""Device mesh construction and the logical-axis rules table, on 8 fake CPU devices and on one device."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from qlx.config import MeshConfig
from qlx.mesh import axis_rules, logical_sharding, logical_to_spec, make_mesh, resolve_sizes


def test_eight_fake_devices_are_visible():
    assert jax.device_count() == 8


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ({"data": 2, "expert": 2, "tensor": 2}, (2, 1, 2, 2, 1)),
        ({"fsdp": -1}, (1, 8, 1, 1, 1)),
        ({"data": 2, "seq": -1}, (2, 1, 1, 1, 4)),
        (MeshConfig(data=1, fsdp=2, expert=-1), (1, 2, 4, 1, 1)),
        (None, (1, 8, 1, 1, 1)),
    ],
)
def test_make_mesh_shapes(sizes, expected):
    mesh = make_mesh(sizes)
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor", "seq")
    assert tuple(mesh.shape.values()) == expected
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_single_device_mesh():
    mesh = make_mesh({"fsdp": -1}, devices=jax.devices()[:1])
    assert tuple(mesh.shape.values()) == (1, 1, 1, 1, 1)


@pytest.mark.parametrize(
    ("sizes", "match"),
    [
        ({"data": 3, "fsdp": -1}, "does not divide the 8 devices"),
        ({"data": 2, "fsdp": 2}, "needs 4 devices but 8 are available"),
        ({"data": -1, "fsdp": -1}, "only one axis may be -1"),
        ({"pipeline": 2}, "unknown axis 'pipeline'"),
    ],
)
def test_bad_mesh_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        resolve_sizes(sizes, 8)


def test_rules_table_maps_parameters_and_activations():
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_to_spec(("experts", "embed", "mlp")) == P("expert", "fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp", "expert"), "seq", None)
    heads = P(("data", "fsdp", "expert"), "seq", "tensor", None)
    assert logical_to_spec(("batch", "length", "heads", "head_dim")) == heads
    assert logical_to_spec((None, "kv_heads")) == P(None, "tensor")


def test_rule_overrides_and_unknown_names():
    rules = axis_rules({"embed": None, "batch": ["data"], "vocab": "fsdp"})
    assert logical_to_spec(("embed", "mlp"), rules) == P(None, "tensor")
    assert logical_to_spec(("batch", "vocab"), rules) == P("data", "fsdp")
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        axis_rules({"embed": "model"})
    with pytest.raises(KeyError, match="logical axis 'hidden' has no rule"):
        logical_to_spec(("hidden",))


def test_logical_sharding_places_shards_on_devices():
    mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
    x = jax.device_put(jax.numpy.arange(4 * 8 * 6.0).reshape(4, 8, 6), logical_sharding(mesh, ("experts", "mlp", None)))
    assert x.sharding.spec == P("expert", "tensor", None)
    assert {s.data.shape for s in x.addressable_shards} == {(2, 4, 6)}
