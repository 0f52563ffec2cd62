"""Generation in one process or several (tests/test_multihost.py starts them): ``python tests/multihost_generate.py
CONFIG RUN_DIR OUT_NPZ`` loads the run's newest checkpoint onto an fsdp 4 x tensor 2 mesh over every process's
devices (``jax.distributed`` when the environment says so; the KV pages split over tensor), samples the same groups
with the static engine and with the continuous engine (few enough KV pages that a group is swapped to host and
back), and process 0 writes both results to OUT_NPZ."""

import sys

import jax
import numpy as np

import qlx
from qlx.distributed import initialize
from qlx.rollout import SamplingSpec, generate_rows
from qlx.rollout.continuous import ContinuousEngine, EngineConfig
from qlx.rollout.engine import concatenate_results
from qlx.train.trainer import load_model

GROUPS = ((46, 1), (44, 1), (40, 2))  # (prompt tokens, samples)
CONFIG = EngineConfig(max_slots=4, page_size=8, num_pages=48, burst=8, max_len=96, prefill_chunk=64, reserve_tokens=0)
HELD_PAGES = 6  # pages admitted for a sequence outside the engine's groups, so the groups run out and one is swapped

if __name__ == "__main__":
    config_path, run_dir, out = sys.argv[1:]
    initialize()
    config = qlx.load_config(config_path, ["mesh.fsdp=4", "mesh.tensor=2"])
    model = load_model(config, run_dir)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n, _ in GROUPS]
    specs, stream = [], 0
    for _, samples in GROUPS:
        specs.append([SamplingSpec(max_new_tokens=50, temperature=0.7, top_p=0.95, seed=9, stream=stream + g)
                      for g in range(samples)])  # fmt: skip
        stream += samples
    static = generate_rows(model, [p for p, s in zip(prompts, specs, strict=True) for _ in s], sum(specs, []))
    engine = ContinuousEngine(model, CONFIG)
    engine.pool.admit("held elsewhere", HELD_PAGES * CONFIG.page_size)
    handles = [engine.submit(p, s) for p, s in zip(prompts, specs, strict=True)]
    engine.run()
    continuous = concatenate_results([h.result() for h in handles], 50)
    if jax.process_index() == 0:
        np.savez(
            out,
            static_tokens=static.tokens,
            static_logprobs=static.logprobs,
            tokens=continuous.tokens,
            logprobs=continuous.logprobs,
            swapped_out_groups=engine.stats().swapped_out_groups,
            processes=jax.process_count(),
        )
    print(f"process {jax.process_index()} of {jax.process_count()} generated {continuous.tokens.shape}")
