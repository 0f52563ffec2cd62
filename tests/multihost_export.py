"""One process of a multi-process export (tests/test_multihost.py starts two): ``python tests/multihost_export.py
CONFIG RUN_DIR OUT_DIR MAX_SHARD_BYTES`` loads the run's newest checkpoint onto the config's mesh over both processes
and writes it with ``qlx.save_hf`` from both."""

import sys

import jax

import qlx
from qlx.distributed import initialize
from qlx.train.trainer import load_model

if __name__ == "__main__":
    config_path, run_dir, out_dir, max_shard_bytes = sys.argv[1:]
    assert initialize(), "expected the multi-process environment of tests/test_multihost.py"
    model = load_model(qlx.load_config(config_path), run_dir)
    written = qlx.save_hf(model, out_dir, max_shard_bytes=int(max_shard_bytes))
    print(f"process {jax.process_index()} of {jax.process_count()} exported {written}")
