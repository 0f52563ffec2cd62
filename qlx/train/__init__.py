"""qlx.train."""
