"""Checkpoints: exact round trip, keep-last-N, a corrupt or half-written latest checkpoint falls back, flipped bits
are found by the checksums, and a checkpoint that does not fit the targets is refused without touching it."""

import dataclasses
import json
import logging
import random
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qlx.config import load_config
from qlx.mesh import make_mesh
from qlx.models import build_model
from qlx.train.checkpoint import Checkpointer, CheckpointMismatch, NoUsableCheckpoint, checksum


def _state(seed: int):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "params": {"w": jax.random.normal(k1, (5, 3)), "b": jax.random.normal(k2, (3,), jnp.bfloat16)},
        "opt_state": (jnp.asarray(seed, jnp.int32), jax.random.uniform(k2, (4,))),
        "extra": {"rng": jax.random.key_data(jax.random.key(seed + 100)), "negatives_on": jnp.asarray(seed % 2 == 0)},
    }


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_keeps_last_n(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (3, 6, 9):
        ckpt.save(step, _state(step), {"sampler": {"cursor": [step, step + 1]}})
    ckpt.wait()
    assert ckpt.steps() == [6, 9]
    step, state, meta = ckpt.restore_latest(_state(0))
    assert step == 9 and meta["sampler"] == {"cursor": [9, 10]} and meta["step"] == 9
    _assert_equal(state, _state(9))
    ckpt.close()


def test_restore_without_checkpoint_is_none(tmp_path):
    assert Checkpointer(tmp_path / "empty").restore_latest(_state(0)) is None


def _corrupt_truncate(step_dir):
    data_files = [p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    for p in data_files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _corrupt_values(step_dir):
    """Swap in the arrays of another checkpoint: readable, but not what this step saved."""
    other = step_dir.parent / "other"
    shutil.rmtree(step_dir / "opt_state")
    shutil.copytree(other / "opt_state", step_dir / "opt_state")


def _corrupt_meta(step_dir):
    shutil.rmtree(step_dir / "meta")


def _corrupt_meta_value(step_dir):
    """Valid JSON, one value changed (what a flipped bit in a digit does): the digest no longer matches."""
    path = step_dir / "meta" / "metadata"
    meta = json.loads(path.read_text())
    meta["n"] += 1
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_values, _corrupt_meta, _corrupt_meta_value])
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, corrupt):
    ckpt = Checkpointer(tmp_path / "run", keep=3)
    ckpt.save(1, _state(1), {"n": 1})
    ckpt.save(2, _state(2), {"n": 2})
    ckpt.wait()
    other = Checkpointer(tmp_path / "scratch")
    other.save(7, _state(7), {"n": 7})
    other.close()
    shutil.copytree(tmp_path / "scratch" / "7", tmp_path / "run" / "other")
    corrupt(tmp_path / "run" / "2")
    shutil.rmtree(tmp_path / "run" / "other")

    fresh = Checkpointer(tmp_path / "run", keep=3)
    with caplog.at_level(logging.WARNING, logger="qlx.models.checkpoint_io"):
        step, state, meta = fresh.restore_latest(_state(0))
    assert step == 1 and meta["n"] == 1
    _assert_equal(state, _state(1))
    assert "checkpoint" in caplog.text and "corrupt" in caplog.text and str(tmp_path / "run" / "2") in caplog.text
    assert (tmp_path / "run" / "corrupt-2").is_dir() and fresh.steps() == [1]
    fresh.save(2, _state(5), {"n": 5})  # the step can be written again after the bad one moved aside
    fresh.wait()
    assert fresh.restore_latest(_state(0))[0] == 2
    fresh.close()


def test_unfinished_save_is_invisible(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(1, _state(1), {})
    ckpt.close()
    # what a process killed mid-write leaves: orbax's temporary folder, never renamed to the step
    shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp-1234")
    fresh = Checkpointer(tmp_path, keep=3)
    assert fresh.steps() == [1]
    assert fresh.restore_latest(_state(0))[0] == 1


def test_restore_one_item(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(4, _state(4), {"n": 4})
    ckpt.close()
    step, items, _ = Checkpointer(tmp_path, read_only=True).restore_latest({"params": _state(0)["params"]})
    assert step == 4 and set(items) == {"params"}
    _assert_equal(items["params"], _state(4)["params"])


def _checksum_reference(x: np.ndarray) -> str:
    """The formula of `checksum` in plain Python integers, one element at a time."""
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    size = x.dtype.itemsize
    words = x.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[size]).astype(np.int64)
    mask = 2**32 - 1

    def fmix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & mask
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & mask
        return h ^ (h >> 16)

    lanes = [0, 0]
    for i, w in enumerate(words.tolist()):
        for lane, seed in enumerate((0x243F6A88, 0x85A308D3)):
            lanes[lane] = (lanes[lane] + fmix((w + fmix((i * 0x9E3779B9 + seed) & mask)) & mask)) & mask
    return "".join(f"{v:08x}" for v in lanes)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.int8, np.bool_, np.uint32])
def test_checksum_matches_reference_and_sees_every_single_bit_flip(dtype):
    x = np.asarray(np.random.default_rng(0).normal(size=(3, 5)) * 50).astype(dtype)
    assert checksum(x) == _checksum_reference(x)
    raw = x.reshape(-1).view(np.uint8)
    seen = {checksum(x)}
    for bit in range(raw.size * 8):
        flipped = raw.copy()
        flipped[bit // 8] ^= 1 << (bit % 8)
        if dtype == np.bool_ and flipped[bit // 8] > 1:
            continue  # not a bool value
        seen.add(checksum(flipped.view(x.dtype).reshape(x.shape)))
    flips = raw.size * 8 if dtype != np.bool_ else raw.size
    assert len(seen) == flips + 1  # every flip gives its own checksum, none the original's


def test_checksum_is_the_same_on_any_sharding():
    x = jax.random.normal(jax.random.key(3), (16, 12), jnp.bfloat16)
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    on_mesh = jax.device_put(x, NamedSharding(mesh, PartitionSpec("a", "b")))
    assert len(on_mesh.addressable_shards) == 8
    assert checksum(on_mesh) == checksum(x) == checksum(np.asarray(x)) == _checksum_reference(np.asarray(x))
    assert checksum(x) != checksum(x.T.reshape(16, 12))  # positions count, not just the values


def _big_state(seed: int):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "params": {"w": jax.random.normal(k1, (48, 40)), "e": jax.random.normal(k2, (40, 24), jnp.bfloat16)},
        "opt_state": (jnp.asarray(seed, jnp.int32), {"mu": jax.random.normal(k3, (48, 40))}),
    }


def _data_files(step_dir):
    return sorted(p for item in ("params", "opt_state") for p in (step_dir / item).rglob("*") if p.parent.name == "d")


def test_random_single_bit_flips_are_detected(tmp_path, caplog):
    """Property over random bit positions in the array data files of the newest checkpoint: the restore either gives
    back exactly what was saved (the bit was outside the values) or reports step 2 as corrupt and uses step 1; never
    damaged values. orbax alone returns damaged values for some of these flips (counted as `silent`)."""
    base = tmp_path / "base"
    ckpt = Checkpointer(base, keep=3)
    ckpt.save(1, _big_state(1), {"n": 1})
    ckpt.save(2, _big_state(2), {"n": 2})
    ckpt.close()
    files = _data_files(base / "2")
    sizes = [p.stat().st_size for p in files]
    rng = random.Random(0)
    outcomes = {"silent": 0, "read error": 0, "harmless": 0}
    for trial in range(12):
        run = tmp_path / f"t{trial}"
        shutil.copytree(base, run)
        bit = rng.randrange(sum(sizes) * 8)
        for path, size in zip(files, sizes, strict=True):
            if bit < size * 8:
                target = run / path.relative_to(base)
                data = bytearray(target.read_bytes())
                data[bit // 8] ^= 1 << (bit % 8)
                target.write_bytes(bytes(data))
                break
            bit -= size * 8
        try:  # what orbax reads without our checks: the oracle of whether the flip changed any value
            raw = {
                item: ocp.StandardCheckpointer().restore(run / "2" / item, _big_state(0)[item])
                for item in ("params", "opt_state")
            }
            damaged = any(
                not np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(_big_state(2)), strict=True)
            )
            outcomes["silent" if damaged else "harmless"] += 1
        except Exception:  # noqa: BLE001 -- any read error counts
            damaged = True
            outcomes["read error"] += 1
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qlx.models.checkpoint_io"):
            step, state, _ = Checkpointer(run, keep=3).restore_latest(_big_state(0))
        if damaged:
            assert step == 1, (trial, outcomes)
            _assert_equal(state, _big_state(1))
            assert "step 2" in caplog.text and "corrupt" in caplog.text and str(run / "corrupt-2") in caplog.text
        else:
            assert step == 2
            _assert_equal(state, _big_state(2))
    assert outcomes["silent"] >= 3, outcomes  # the checksums, not orbax, caught these


def test_layout_mismatch_names_the_leaves_and_touches_nothing(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(1, _state(1), {"n": 1})
    ckpt.save(2, _state(2), {"n": 2})
    ckpt.close()
    before = sorted((str(p.relative_to(tmp_path)), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    wider = _state(0)
    wider["params"]["w"] = jnp.zeros((5, 4))
    with pytest.raises(
        CheckpointMismatch, match=r"params\.w: float32\[5, 4\] in this config, float32\[5, 3\] in the ch"
    ):
        Checkpointer(tmp_path, keep=3).restore_latest(wider)
    longer = _state(0)
    longer["opt_state"] = (*longer["opt_state"], jnp.zeros(2))
    with pytest.raises(CheckpointMismatch, match=r"opt_state\.2: float32\[2\] in this config, absent from the") as e:
        Checkpointer(tmp_path, keep=3).restore_latest(longer)
    assert e.value.step == 2 and e.value.meta["n"] == 2
    after = sorted((str(p.relative_to(tmp_path)), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    assert after == before


def test_every_checkpoint_corrupt_raises_and_reports_each(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(1, _state(1), {"n": 1})
    ckpt.save(2, _state(2), {"n": 2})
    ckpt.close()
    _corrupt_truncate(tmp_path / "1")
    _corrupt_meta_value(tmp_path / "2")
    with (
        caplog.at_level(logging.WARNING, logger="qlx.models.checkpoint_io"),
        pytest.raises(NoUsableCheckpoint, match=r"step 2: .*digest.*step 1: .*cannot be read"),
    ):
        Checkpointer(tmp_path, keep=3).restore_latest(_state(0))
    for step in (1, 2):
        assert f"checkpoint step {step}" in caplog.text and str(tmp_path / f"corrupt-{step}") in caplog.text
        assert (tmp_path / f"corrupt-{step}").is_dir() and not (tmp_path / str(step)).exists()


def test_restore_onto_another_mesh_verifies(tmp_path):
    """Saved sharded one way, restored sharded another: the checksums still match and the values are exact."""
    state = _big_state(5)
    row = NamedSharding(jax.make_mesh((8,), ("x",)), PartitionSpec("x"))
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(1, jax.device_put(state, jax.tree.map(lambda a: row if a.ndim else None, state)), {})
    ckpt.close()
    other = NamedSharding(jax.make_mesh((2, 4), ("a", "b")), PartitionSpec("b", "a"))
    targets = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=other if a.ndim else other.update(spec=())), state
    )
    step, restored, _ = Checkpointer(tmp_path, read_only=True).restore_latest(targets)
    assert step == 1 and restored["params"]["w"].sharding == other
    _assert_equal(restored, state)


TINY = dataclasses.replace(
    load_config(Path(__file__).resolve().parents[1] / "configs/models/tiny-dense.yaml").model,
    num_layers=2,
    vocab_size=64,
    hidden_size=32,
    head_dim=8,
    intermediate_size=32,
)


def _model_items(params):
    """Model parameters and an Adam-like state mirroring them."""
    return {"params": params, "opt_state": ({"mu": jax.tree.map(lambda x: 2 * x, params), "count": jnp.int32(3)},)}


def test_restores_into_the_other_layer_layout(tmp_path):
    """Saved unrolled, restored scanned (onto an fsdp mesh, in the target's shardings and tree types) and the reverse:
    parameters and the optimizer state equal the other layout's (same seed); the checksums are still checked (a step
    whose arrays were swapped falls back); a target that does not fit names the leaf."""
    mesh = make_mesh({"fsdp": 8})
    saved = {
        scan: _model_items(nnx.state(build_model(dataclasses.replace(TINY, scan_layers=scan), mesh=m), nnx.Param))
        for scan, m in ((False, None), (True, mesh))
    }
    for scan in (False, True):
        folder = tmp_path / f"saved-{scan}"
        ckpt = Checkpointer(folder, keep=3)
        ckpt.save(1, saved[scan], {})
        ckpt.save(2, saved[scan], {})
        ckpt.save(9, jax.tree.map(lambda x: x + 1, saved[scan]), {})  # scratch: its arrays replace step 2's
        ckpt.close()
        shutil.rmtree(folder / "2" / "params")
        shutil.copytree(folder / "9" / "params", folder / "2" / "params")
        shutil.rmtree(folder / "9")
    for scan in (False, True):
        target = saved[not scan]
        step, items, _ = Checkpointer(tmp_path / f"saved-{scan}", keep=3).restore_latest(target)
        assert step == 1  # step 2 failed its checksums, read in the saved layout
        assert jax.tree.structure(items) == jax.tree.structure(target)
        _assert_equal(items, target)
        for got, want in zip(jax.tree.leaves(items), jax.tree.leaves(target), strict=True):
            assert got.sharding == want.sharding
    deeper = nnx.state(build_model(dataclasses.replace(TINY, num_layers=3, scan_layers=True)), nnx.Param)
    with pytest.raises(
        CheckpointMismatch, match=r"params\.layers\.2\.attn\.q\.value: float32\[.*\] in this config, abs"
    ):
        Checkpointer(tmp_path / "saved-False", read_only=True).restore_latest({"params": deeper})
