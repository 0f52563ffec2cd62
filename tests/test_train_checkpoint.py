"""Checkpoints: exact round trip, keep-last-N, and a corrupt or half-written latest checkpoint falls back."""

import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlx.train.checkpoint import Checkpointer


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


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_values, _corrupt_meta])
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
    with caplog.at_level(logging.WARNING, logger="qlx.train.checkpoint"):
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
