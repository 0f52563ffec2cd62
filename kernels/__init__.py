"""qlx.kernels: long-context attention kernels. Imports nothing from the rest of qlx.

flash_attention     memory-efficient attention in the [B, T, H, D] layout (Pallas TPU / GPU, XLA blockwise, reference)
sharded_flash_attention    flash_attention in a shard_map over batch / head mesh axes (Pallas kernels on a mesh)
ring_attention      sequence-parallel attention over a mesh axis (K/V rotate with ppermute; zig-zag causal balance)
balance_tokens, unbalance_tokens, balanced_positions    the zig-zag layout ring attention balances with
merge_partials      merge two attention results over disjoint key sets through their log-sum-exp
paged_attention     decode attention over a paged KV cache (XLA blockwise, Pallas TPU / GPU); shared-prefix
                    (cascade) variant shared_prefix_paged_attention; write_tokens, copy_pages
BlockSizes          tile sizes (each backend module subclasses it with its defaults and constraints)
"""

from .common import BlockSizes, merge_partials
from .flash import BACKENDS, flash_attention, sharded_flash_attention
from .layout import balance_tokens, balanced_positions, chunk_order, unbalance_tokens
from .paged import (
    PagedBlockSizes,
    copy_pages,
    paged_attention,
    paged_reference,
    shared_prefix_paged_attention,
    write_tokens,
)
from .reference import mha_reference
from .ring import ring_attention

__all__ = [
    "BACKENDS",
    "BlockSizes",
    "PagedBlockSizes",
    "balance_tokens",
    "balanced_positions",
    "chunk_order",
    "copy_pages",
    "flash_attention",
    "merge_partials",
    "mha_reference",
    "paged_attention",
    "paged_reference",
    "ring_attention",
    "shared_prefix_paged_attention",
    "sharded_flash_attention",
    "unbalance_tokens",
    "write_tokens",
]
