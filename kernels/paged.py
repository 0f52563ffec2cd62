"""Decode attention over a paged KV cache: one query per sequence against the pages of its page table, reading only
the pages that hold tokens.

Layout (that of the JAX Pallas paged kernels, TPU ``paged_attention`` and GPU ``paged_attention``):
  q [B, Hq, D]; k_pages, v_pages [KV, num_pages, page_size, D]; lengths [B] int32 (tokens per sequence, 0: an empty
  slot); page_table [B, pages_per_seq] int32: token t of sequence b is slot t % page_size of page
  page_table[b, t // page_size]. Entries past a sequence's last page are never read (pad them with page 0).

  s[b, h, t] = sm_scale * q[b, h] . k_pages[h // G, page_table[b, t // page_size], t % page_size]   (t < lengths[b])
  lse[b, h] = log sum_t exp(s[b, h, t]);   o[b, h] = sum_t exp(s[b, h, t] - lse[b, h]) v_pages[same index]
with G = Hq // KV. A sequence of length 0 gets o = 0 and lse = -inf.

Backends (``paged_attention(backend=...)``):
- ``"xla"`` (CPU, and the oracle's blockwise twin): a ragged loop over the (row, block) pairs that hold tokens, a
  block being ``pages_per_block`` page-table columns; each step gathers B such blocks (of any rows) and merges
  their partial softmaxes into their rows'. It reads sum_b ceil(lengths[b] / block) blocks: the real tokens, each
  row rounded up to one block, not the cache bucket and not B x the longest row. Also returns lse.
- ``"pallas_tpu"``: ``jax.experimental.pallas.ops.tpu.paged_attention`` (per-row lengths: it skips a row's pages
  past its length); ``"pallas_gpu"``: ``jax.experimental.pallas.ops.gpu.paged_attention`` with ``k_splits``
  (split-K over the pages, for long contexts and one query). Neither returns lse, so ``return_lse`` (and
  :func:`shared_prefix_paged_attention`) runs on ``"xla"`` only for now.
- ``"auto"``: the platform's Pallas kernel without ``return_lse`` on TPU / GPU, else ``"xla"``.

:func:`paged_reference` gathers every page of the table into a dense [B, S, KV, D] cache and runs
:func:`~.reference.mha_reference` (small sizes only).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from .common import MASK_VALUE, finish_rows, merge_partials
from .reference import mha_reference

__all__ = [
    "PAGED_BACKENDS",
    "PagedBlockSizes",
    "copy_pages",
    "paged_attention",
    "paged_reference",
    "shared_prefix_paged_attention",
    "write_tokens",
]

PAGED_BACKENDS = ("auto", "xla", "pallas_tpu", "pallas_gpu")


@dataclasses.dataclass(frozen=True)
class PagedBlockSizes:
    """Tiles of the paged kernels.

    pages_per_block: page-table columns one step reads (XLA: one gather per step; Pallas: ``pages_per_compute_block``,
      which must divide the table width, so the table is padded with page 0 to a multiple of it).
    k_splits: GPU only: key splits (FlashDecoding split-K) over the pages.
    block_h: GPU only: query heads per program (a multiple of 16; the kernel pads head groups to it).
    """

    pages_per_block: int = 8
    k_splits: int = 16
    block_h: int = 16

    def __post_init__(self):
        """Every field is a positive int; block_h is a multiple of 16."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PagedBlockSizes.{field.name} must be a positive int, got {value!r}")
        if self.block_h % 16:
            raise ValueError(f"PagedBlockSizes.block_h must be a multiple of 16, got {self.block_h}")


def check_paged(q, k_pages, v_pages, lengths, page_table) -> None:
    """Raise a ValueError naming the tensor when the paged inputs do not fit together."""
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, heads, head_dim] (one decode query per sequence), got shape {q.shape}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            f"k_pages and v_pages must both be [kv_heads, num_pages, page_size, head_dim], got {k_pages.shape} and "
            f"{v_pages.shape}"
        )
    b, hq, d = q.shape
    kv = k_pages.shape[0]
    if k_pages.shape[3] != d:
        raise ValueError(f"q head_dim {d} != k_pages head_dim {k_pages.shape[3]}")
    if hq % kv:
        raise ValueError(f"query heads ({hq}, q.shape[1]) must be a multiple of kv heads ({kv}, k_pages.shape[0])")
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an int array [batch] = ({b},), got {lengths.dtype}{list(lengths.shape)}")
    if page_table.ndim != 2 or page_table.shape[0] != b or not jnp.issubdtype(page_table.dtype, jnp.integer):
        raise ValueError(
            f"page_table must be an int array [batch, pages_per_seq] with batch {b}, got "
            f"{page_table.dtype}{list(page_table.shape)}"
        )


def _pad_table(page_table, multiple: int):
    return jnp.pad(page_table, ((0, 0), (0, -page_table.shape[1] % multiple)))


def paged_reference(q, k_pages, v_pages, lengths, page_table, *, sm_scale: float):
    """Dense oracle: every page of the table gathered into [B, S, KV, D] (S = pages_per_seq x page_size), keys
    t >= lengths[b] masked, then :func:`mha_reference`. Returns (o [B, Hq, D] in q.dtype, lse [B, Hq] float32)."""
    kv, _, page_size, d = k_pages.shape
    b, width = page_table.shape

    def dense(pages):
        return jnp.transpose(pages[:, page_table], (1, 2, 3, 0, 4)).reshape(b, width * page_size, kv, d)

    kv_seg = (jnp.arange(width * page_size)[None, :] >= lengths[:, None]).astype(jnp.int32)  # 0: a real token
    q_seg = jnp.zeros((b, 1), jnp.int32)
    o, lse = mha_reference(q[:, None], dense(k_pages), dense(v_pages), q_seg, kv_seg, causal=False, sm_scale=sm_scale)
    return o[:, 0], lse[:, 0]


def _xla_paged(q, k_pages, v_pages, lengths, page_table, *, sm_scale: float, pages_per_block: int):
    """The ragged blockwise loop of the module docstring. Returns (o [B, Hq, D] in q.dtype, lse [B, Hq] float32).

    Work items are the (row, block) pairs that hold tokens, numbered row by row (row r owns items
    [starts[r], ends[r])); step j takes items [jB, (j + 1)B), gathers their pages, computes each item's partial
    softmax (m_i, l_i, acc_i) and merges it into its row's running (m, l, acc) with segment max / sums.
    """
    b, hq, d = q.shape
    kv, _, page_size, _ = k_pages.shape
    g = hq // kv
    table = _pad_table(page_table, pages_per_block)
    block = pages_per_block * page_size
    blocks_b = jnp.minimum((lengths + block - 1) // block, table.shape[1] // pages_per_block).astype(jnp.int32)
    ends_b = jnp.cumsum(blocks_b)
    starts_b = ends_b - blocks_b
    q_bkgd = q.astype(jnp.float32).reshape(b, kv, g, d) * sm_scale

    def step(j, carry):
        m, l, acc = carry
        items = j * b + jnp.arange(b, dtype=jnp.int32)
        live = items < ends_b[-1]
        row = jnp.minimum(jnp.searchsorted(ends_b, items, side="right"), b - 1).astype(jnp.int32)
        col = jnp.where(live, items - starts_b[row], 0)  # the item's block within its row
        pages = table[row[:, None], col[:, None] * pages_per_block + jnp.arange(pages_per_block)]  # [B, ppb]
        k, v = (x[:, pages].reshape(kv, b, block, d) for x in (k_pages, v_pages))
        s = jnp.einsum("wkgd,kwtd->wkgt", q_bkgd[row], k, preferred_element_type=jnp.float32)
        visible = live[:, None] & ((col[:, None] * block + jnp.arange(block)) < lengths[row][:, None])
        s = jnp.where(visible[:, None, None, :], s, MASK_VALUE)
        m_i = jnp.max(s, axis=-1)
        p = jnp.where(visible[:, None, None, :], jnp.exp(s - m_i[..., None]), 0.0)
        acc_i = jnp.einsum("wkgt,kwtd->wkgd", p, v, preferred_element_type=jnp.float32)
        m_new = jnp.maximum(m, jax.ops.segment_max(m_i, row, num_segments=b))
        w_i, alpha = jnp.exp(m_i - m_new[row]), jnp.exp(m - m_new)
        l = alpha * l + jax.ops.segment_sum(w_i * jnp.sum(p, axis=-1), row, num_segments=b)
        acc = alpha[..., None] * acc + jax.ops.segment_sum(w_i[..., None] * acc_i, row, num_segments=b)
        return m_new, l, acc

    init = (
        jnp.full((b, kv, g), MASK_VALUE, jnp.float32),
        jnp.zeros((b, kv, g), jnp.float32),
        jnp.zeros((b, kv, g, d), jnp.float32),
    )
    m, l, acc = lax.fori_loop(0, (ends_b[-1] + b - 1) // b, step, init)
    o, lse = finish_rows(acc, m, l)
    return o.reshape(b, hq, d).astype(q.dtype), lse.reshape(b, hq)


def _pallas_paged(backend: str, q, k_pages, v_pages, lengths, page_table, *, sm_scale, sizes, interpret):
    table = _pad_table(page_table, sizes.pages_per_block)
    q = (q.astype(jnp.float32) * sm_scale).astype(q.dtype)  # the kernels take pre-scaled queries
    lengths = lengths.astype(jnp.int32)
    if backend == "pallas_tpu":
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_paged_attention

        o = tpu_paged_attention(q, k_pages, v_pages, lengths, table, pages_per_compute_block=sizes.pages_per_block)
    else:
        from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as gpu_paged_attention

        o = gpu_paged_attention(
            q,
            k_pages,
            v_pages,
            table,
            lengths,
            block_h=sizes.block_h,
            pages_per_compute_block=sizes.pages_per_block,
            k_splits=sizes.k_splits,
            interpret=interpret,
        )
    return jnp.where((lengths > 0)[:, None, None], o, 0).astype(q.dtype)  # empty slots: 0, as on "xla"


def _resolve(backend: str, return_lse: bool) -> str:
    if backend not in PAGED_BACKENDS:
        raise ValueError(f"paged_attention backend {backend!r}: valid values are {', '.join(PAGED_BACKENDS)}")
    if backend == "auto":
        platform = jax.default_backend()
        pallas = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}.get(platform)
        return "xla" if return_lse or pallas is None else pallas
    if return_lse and backend != "xla":
        raise ValueError(f"paged_attention(return_lse=True) runs on backend 'xla' only; {backend!r} returns o alone")
    return backend


def paged_attention(
    q,
    k_pages,
    v_pages,
    lengths,
    page_table,
    *,
    sm_scale: float | None = None,
    backend: str = "auto",
    block_sizes: PagedBlockSizes | None = None,
    return_lse: bool = False,
    interpret: bool = False,
):
    """Decode attention over pages (layout and formula in the module docstring).

    q [B, Hq, D]; k_pages, v_pages [KV, num_pages, page_size, D]; lengths [B]; page_table [B, pages_per_seq].
    sm_scale defaults to D ** -0.5. ``interpret`` runs the GPU Pallas kernel in interpret mode (CPU tests).
    Returns o [B, Hq, D] in q.dtype, and with ``return_lse`` also lse [B, Hq] float32.
    """
    check_paged(q, k_pages, v_pages, lengths, page_table)
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    sizes = block_sizes or PagedBlockSizes()
    if not isinstance(sizes, PagedBlockSizes):
        raise ValueError(f"block_sizes must be a qlx.kernels.PagedBlockSizes, got {type(sizes).__name__}")
    name = _resolve(backend, return_lse)
    if name == "xla":
        o, lse = _xla_paged(
            q, k_pages, v_pages, lengths, page_table, sm_scale=sm_scale, pages_per_block=sizes.pages_per_block
        )
        return (o, lse) if return_lse else o
    return _pallas_paged(
        name, q, k_pages, v_pages, lengths, page_table, sm_scale=sm_scale, sizes=sizes, interpret=interpret
    )


def shared_prefix_paged_attention(
    q,
    k_pages,
    v_pages,
    prefix_lengths,
    prefix_table,
    suffix_lengths,
    suffix_table,
    *,
    sm_scale: float | None = None,
    block_sizes: PagedBlockSizes | None = None,
):
    """Decode attention for N groups of G sequences that share a prompt (cascade / Hydragen attention).

    q [N, G, Hq, D]; prefix_lengths [N] and prefix_table [N, Wp]: the group's shared prompt pages; suffix_lengths
    [N, G] and suffix_table [N, G, Ws]: each sequence's own pages. Sequence (n, g) attends to the prefix tokens and
    then its suffix tokens. The prefix is read once per group: its G x Hq queries form one row of
    :func:`paged_attention` with G x Hq heads (query (g, h) keeps kv head h // (Hq // KV)); the suffix is read per
    sequence; the two are merged by their log-sum-exp (:func:`~.common.merge_partials`). Equal to
    :func:`paged_attention` over the concatenated table [prefix pages, suffix pages] when every prefix length is a
    multiple of page_size (the pool shares full prompt pages only). Both partials and their merge are float32; returns
    o [N, G, Hq, D] in q.dtype.
    """
    if q.ndim != 4:
        raise ValueError(f"q must be [groups, group_size, heads, head_dim], got shape {q.shape}")
    n, g, hq, d = q.shape
    kv = k_pages.shape[0]
    if suffix_lengths.shape != (n, g) or suffix_table.ndim != 3 or suffix_table.shape[:2] != (n, g):
        raise ValueError(
            f"suffix_lengths must be [groups, group_size] = {(n, g)} and suffix_table [groups, group_size, pages], "
            f"got {suffix_lengths.shape} and {suffix_table.shape}"
        )
    if hq % kv:
        raise ValueError(f"query heads ({hq}, q.shape[2]) must be a multiple of kv heads ({kv}, k_pages.shape[0])")
    run = dict(sm_scale=sm_scale, backend="xla", block_sizes=block_sizes, return_lse=True)
    heads = hq // kv
    dtype, q = q.dtype, q.astype(jnp.float32)  # partials stay float32 until the merged result
    q_group = q.reshape(n, g, kv, heads, d).transpose(0, 2, 1, 3, 4).reshape(n, kv * g * heads, d)
    o_p, lse_p = paged_attention(q_group, k_pages, v_pages, prefix_lengths, prefix_table, **run)
    o_p = o_p.reshape(n, kv, g, heads, d).transpose(0, 2, 1, 3, 4).reshape(n, g, hq, d)
    lse_p = lse_p.reshape(n, kv, g, heads).transpose(0, 2, 1, 3).reshape(n, g, hq)
    o_s, lse_s = paged_attention(
        q.reshape(n * g, hq, d), k_pages, v_pages, suffix_lengths.reshape(n * g), suffix_table.reshape(n * g, -1), **run
    )
    o, _ = merge_partials(o_p, lse_p, o_s.reshape(n, g, hq, d), lse_s.reshape(n, g, hq))
    return o.astype(dtype)


def write_tokens(pages, new_btkd, page_table, positions_bt):
    """pages [KV, num_pages, page_size, D] with new_btkd [B, T, KV, D] written at their positions: token t of row b
    to slot positions[b, t] % page_size of page page_table[b, positions[b, t] // page_size] (T = 1: a decode step;
    T > 1: a prefill chunk, which may cross pages). A negative position (padding, an empty slot) writes nothing."""
    page_size = pages.shape[2]
    safe_bt = jnp.maximum(positions_bt, 0)
    page_bt = jnp.take_along_axis(page_table, safe_bt // page_size, axis=1)
    page_bt = jnp.where(positions_bt >= 0, page_bt, pages.shape[1])  # out of range: dropped
    update = jnp.moveaxis(new_btkd, 2, 0).astype(pages.dtype)  # [KV, B, T, D]
    return pages.at[:, page_bt, safe_bt % page_size].set(update, mode="drop")


def copy_pages(pages, src, dst):
    """pages [KV, num_pages, page_size, D] with whole pages src[i] copied to dst[i] (the pool's copy-on-write
    copies), before the writes that follow them."""
    return pages.at[:, dst].set(pages[:, src])
