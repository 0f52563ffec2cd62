"""Paged decode attention against the dense KV-cache attention, the shared-prefix variant against the plain one.

The pages are filled the way the engine will fill them: through the host pool (``qlx.rollout.kv_pages``: a prompt
admitted once per group, forked G times, copy-on-write of the partial last page) and the device writes
(``write_tokens``, ``copy_pages``); every sequence must then attend exactly over its own token history.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from qlx.kernels import (
    PagedBlockSizes,
    copy_pages,
    mha_reference,
    paged_attention,
    paged_reference,
    shared_prefix_paged_attention,
    write_tokens,
)

from qlx.models.attention import cache_attention
from qlx.rollout.kv_pages import PagePool

ROOT = Path(__file__).resolve().parents[1]
RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2**-8}


def assert_close(out, want, dtype):
    """f32: |out - want| <= 1e-5. bf16: against the float32 result on the same (bf16) inputs, within one rounding to
    bf16, |out - want| <= 2**-8 |want| + 1e-5 (bf16's unit roundoff is 2**-8; the issue's absolute 2e-3 is below one
    bf16 ulp wherever |o| > 0.5, so no bf16 output can meet it there)."""
    out, want = np.asarray(out, np.float32), np.asarray(want, np.float32)
    if dtype == jnp.float32:
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
    else:
        np.testing.assert_allclose(out, want, rtol=2**-8, atol=1e-5)


def _normal(seed, dtype, *shapes):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape, np.float32), dtype) for shape in shapes]


def _paginate(k_bskd, page_size, seed):
    """Dense [B, S, KV, D] -> pages [KV, num_pages, page_size, D] at random page ids (unused pages and the dummy
    page 0 hold large garbage, the last page NaN) and the page table [B, S / page_size]."""
    b, s, kv, d = k_bskd.shape
    width = s // page_size
    rng = np.random.default_rng(seed)
    table = (1 + rng.permutation(b * width)).reshape(b, width).astype(np.int32)
    pages = np.full((kv, 1 + b * width + 3, page_size, d), 1e4, np.float32)
    blocks = np.asarray(k_bskd, np.float32).reshape(b, width, page_size, kv, d).transpose(3, 0, 1, 2, 4)
    pages[:, table] = blocks
    pages[:, -1] = np.nan
    return jnp.asarray(pages, k_bskd.dtype), jnp.asarray(table)


@pytest.mark.parametrize(
    ("dtype", "hq", "kv", "pages_per_block"),
    [(jnp.float32, 4, 4, 2), (jnp.float32, 8, 2, 3), (jnp.bfloat16, 6, 1, 1), (jnp.bfloat16, 8, 2, 4)],
)
def test_paged_equals_dense_cache_attention(dtype, hq, kv, pages_per_block):
    b, page_size, width, d = 4, 4, 6, 16
    s = page_size * width
    q, k, v = _normal(0, dtype, (b, hq, d), (b, s, kv, d), (b, s, kv, d))
    lengths = jnp.array([1, 9, 24, 13], jnp.int32)
    k_pages, table = _paginate(k, page_size, 1)
    v_pages, _ = _paginate(v, page_size, 1)
    # entries past a row's last page point at the garbage-filled dummy page 0, as the pool pads them; entries in
    # blocks wholly past a row's tokens at a NaN page: a finite result shows those blocks are never read
    columns = jnp.arange(width)[None, :]
    live_page = columns * page_size < lengths[:, None]
    live_block = columns // pages_per_block * pages_per_block * page_size < lengths[:, None]
    padded = jnp.where(live_page, table, 0)
    table = jnp.where(live_block, padded, k_pages.shape[1] - 1)
    assert not bool(jnp.all(live_block))
    sizes = PagedBlockSizes(pages_per_block=pages_per_block)
    out, lse = jax.jit(lambda *a: paged_attention(*a, backend="xla", block_sizes=sizes, return_lse=True))(
        q, k_pages, v_pages, lengths, table
    )
    f32 = [x.astype(jnp.float32) for x in (q, k, v, k_pages, v_pages)]
    dense = jax.jit(lambda q, k, v: cache_attention(q[:, None], k, v, (lengths - 1)[:, None], d**-0.5))(*f32[:3])
    assert_close(out, dense[:, 0], dtype)
    ref_o, ref_lse = jax.jit(lambda *a: paged_reference(*a, sm_scale=d**-0.5))(f32[0], *f32[3:], lengths, padded)
    assert_close(out, ref_o, dtype)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-5, atol=1e-5)


def test_empty_row_gives_zero_and_bad_inputs_name_the_tensor():
    k_pages = jnp.ones((2, 5, 4, 8))
    q = jnp.ones((2, 4, 8))
    lengths = jnp.array([0, 3], jnp.int32)
    table = jnp.array([[0, 0], [1, 0]], jnp.int32)
    out, lse = paged_attention(q, k_pages, k_pages, lengths, table, backend="xla", return_lse=True)
    assert np.all(np.asarray(out[0]) == 0) and np.all(np.isneginf(np.asarray(lse[0])))
    np.testing.assert_allclose(np.asarray(out[1]), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match=r"query heads \(3, q.shape\[1\]\) must be a multiple of kv heads"):
        paged_attention(jnp.ones((2, 3, 8)), k_pages, k_pages, lengths, table)
    with pytest.raises(ValueError, match="page_table must be an int array"):
        paged_attention(q, k_pages, k_pages, lengths, table.astype(jnp.float32))
    with pytest.raises(ValueError, match="runs on backend 'xla' only"):
        paged_attention(q, k_pages, k_pages, lengths, table, backend="pallas_tpu", return_lse=True)
    with pytest.raises(ValueError, match="block_h must be a multiple of 16"):
        PagedBlockSizes(block_h=8)


def _fill_groups(prompts, suffixes, page_size, kv, d, dtype, seed):
    """Run the pool and the device writes for groups of sequences: group n's prompt (prompts[n] tokens) admitted
    once, written in chunks of 3 tokens (crossing pages), and forked per sample; then suffixes[n][g] decode tokens
    appended one step at a time. Each step: the pool's extensions and copies, then one write of every growing
    sequence's new K/V. Returns the pool, the pages and each sequence's K/V history [L, KV, D]."""
    rng = np.random.default_rng(seed)
    pool = PagePool(num_pages=64, page_size=page_size)
    pages = {name: jnp.zeros((kv, 64, page_size, d), dtype) for name in "kv"}
    history = {}
    rows = 8  # fixed shapes: unused rows write at position -1 (nothing), unused copies copy page 0 onto itself
    write, copy = jax.jit(write_tokens), jax.jit(copy_pages)

    def step(counts, width):
        """Append counts[seq] (<= width) tokens to each sequence."""
        seqs = list(counts)
        ops = [op for seq in seqs for op in pool.extend(seq, counts[seq])]
        src, dst = (
            np.array([getattr(op, f) for op in ops] + [0] * (rows - len(ops)), np.int32) for f in ("src", "dst")
        )
        pages.update({name: copy(x, src, dst) for name, x in pages.items()})
        table = np.zeros((rows, 16), np.int32)
        table[: len(seqs)] = pool.page_table(seqs, 16)
        positions = np.full((rows, width), -1, np.int32)
        for i, seq in enumerate(seqs):
            positions[i, : counts[seq]] = pool.length(seq) - counts[seq] + np.arange(counts[seq])
        new = {name: rng.standard_normal((rows, width, kv, d)).astype(np.float32) for name in "kv"}
        for name in "kv":
            pages[name] = write(pages[name], jnp.asarray(new[name], dtype), table, positions)
        for i, seq in enumerate(seqs):
            history[seq] += [{name: new[name][i, t] for name in "kv"} for t in range(counts[seq])]

    prompt_ids = [("prompt", n) for n in range(len(prompts))]
    for seq in prompt_ids:
        pool.admit(seq, 0)
        history[seq] = []
    for t in range(0, max(prompts), 3):
        step({seq: min(3, n - t) for seq, n in zip(prompt_ids, prompts, strict=True) if t < n}, 3)
    for n, group in enumerate(suffixes):
        for g in range(len(group)):
            pool.fork(prompt_ids[n], (n, g))
            history[(n, g)] = list(history[prompt_ids[n]])
        pool.release(prompt_ids[n])
    for t in range(max(max(group) for group in suffixes)):
        step({(n, g): 1 for n, group in enumerate(suffixes) for g, length in enumerate(group) if t < length}, 1)
    pool.check()
    return (
        pool,
        pages,
        {s: {n: np.stack([r[n] for r in h]) for n in "kv"} for s, h in history.items() if s[0] != "prompt"},
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shared_prefix_equals_plain_paged_and_each_sequence_reads_its_own_history(dtype):
    page_size, kv, hq, d, g = 4, 2, 4, 8, 3
    prompts, suffixes = [10, 8], [[5, 1, 9], [3, 6, 2]]
    pool, pages, dense = _fill_groups(prompts, suffixes, page_size, kv, d, dtype, seed=0)
    seqs = [(n, j) for n in range(2) for j in range(g)]
    (q,) = _normal(3, dtype, (2, g, hq, d))
    lengths = jnp.array([pool.length(s) for s in seqs], jnp.int32)
    width = 8
    plain = paged_attention(
        q.reshape(2 * g, hq, d),
        pages["k"],
        pages["v"],
        lengths,
        jnp.asarray(pool.page_table(seqs, width)),
        backend="xla",
    )
    reference = jax.jit(lambda q, k, v: mha_reference(q, k, v, causal=False, sm_scale=d**-0.5))
    for row, seq in enumerate(seqs):  # each sequence attends over exactly its own tokens
        k, v = (jnp.asarray(dense[seq][n][None], dtype).astype(jnp.float32) for n in "kv")
        q_row = q.reshape(2 * g, 1, hq, d)[row : row + 1].astype(jnp.float32)
        want, _ = reference(q_row, k, v)
        assert_close(plain[row], want[0, 0], dtype)
    shared = [pool.shared_prefix_pages([(n, j) for j in range(g)]) for n in range(2)]
    assert shared == [2, 2]  # 10 tokens: 2 full pages shared, the partial third copied on write; 8: both full
    prefix_table = np.zeros((2, width), np.int32)
    suffix_table = np.zeros((2, g, width), np.int32)
    suffix_lengths = np.zeros((2, g), np.int32)
    for n in range(2):
        prefix_table[n, : shared[n]] = pool.pages((n, 0))[: shared[n]]
        for j in range(g):
            own = pool.pages((n, j))[shared[n] :]
            suffix_table[n, j, : len(own)] = own
            suffix_lengths[n, j] = pool.length((n, j)) - shared[n] * page_size
    out = shared_prefix_paged_attention(
        q,
        pages["k"],
        pages["v"],
        jnp.array(shared, jnp.int32) * page_size,
        jnp.asarray(prefix_table),
        jnp.asarray(suffix_lengths),
        jnp.asarray(suffix_table),
        block_sizes=PagedBlockSizes(pages_per_block=2),
    )
    # both round one float32 result to the dtype: equal up to one bf16 ulp
    np.testing.assert_allclose(
        np.asarray(out.reshape(2 * g, hq, d), np.float32),
        np.asarray(plain, np.float32),
        rtol=2 * RTOL[dtype],
        atol=1e-5,
    )


def test_gpu_pallas_kernel_in_interpret_mode_equals_xla():
    b, hq, kv, d, page_size, width = 3, 16, 2, 32, 8, 4
    q, k, v = _normal(1, jnp.float32, (b, hq, d), (b, page_size * width, kv, d), (b, page_size * width, kv, d))
    k_pages, table = _paginate(k, page_size, 2)
    v_pages, _ = _paginate(v, page_size, 2)
    lengths = jnp.array([32, 19, 0], jnp.int32)  # full, partial, an empty slot
    sizes = PagedBlockSizes(pages_per_block=2, k_splits=2)
    gpu = paged_attention(q, k_pages, v_pages, lengths, table, backend="pallas_gpu", block_sizes=sizes, interpret=True)
    xla = paged_attention(q, k_pages, v_pages, lengths, table, backend="xla")
    np.testing.assert_allclose(np.asarray(gpu), np.asarray(xla), atol=1e-5)


TPU_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding
    from unittest import mock
    from qlx.kernels import PagedBlockSizes, paged_attention
    device = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices[0]
    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=SingleDeviceSharding(device))
    b, hq, kv, d, pages, page_size, width = 8, 32, 8, 128, 256, 128, 16
    args = (spec((b, hq, d), jnp.bfloat16), spec((kv, pages, page_size, d), jnp.bfloat16),
            spec((kv, pages, page_size, d), jnp.bfloat16), spec((b,), jnp.int32), spec((b, width), jnp.int32))
    with mock.patch.object(jax, "default_backend", lambda: "tpu"):
        fn = jax.jit(lambda *a: paged_attention(*a, block_sizes=PagedBlockSizes(pages_per_block=4)))
        lowered = fn.lower(*args)
    compiled = lowered.compile()
    print("PAGED", "tpu_custom_call" in lowered.as_text(), compiled.memory_analysis().temp_size_in_bytes)
    """
)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_pallas_tpu_paged_attention_compiles_for_tpu(tmp_path):
    """backend 'auto' on a TPU picks the Pallas paged kernel; it lowers to a Mosaic custom call and compiles for a
    TPU v5p chip ahead of time (128-token pages, bf16, GQA 32/8, head_dim 128)."""
    env = dict(os.environ, TMPDIR=str(tmp_path), TPU_ACCELERATOR_TYPE="v5p-8", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-c", TPU_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if out.returncode and "libtpu multi-process lockfile" in out.stderr:
        pytest.skip(
            "libtpu is held by another process on this host (its lock is /tmp/libtpu_lockfile, whatever TMPDIR)"
        )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("PAGED"))
    assert line.split()[1] == "True"
