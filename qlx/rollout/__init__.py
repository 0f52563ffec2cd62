"""qlx.rollout."""
