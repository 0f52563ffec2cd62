"""qlx.kernels: attention kernels (flash attention, ring attention). Imports nothing from the rest of qlx."""
