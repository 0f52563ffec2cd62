"""qlx.train: the training loops of the recipe and what they write.

- ``trainer.train(config)``: SFT or RL (``config.train.mode``), resumable bit for bit; ``trainer.load_model``.
- ``rl.RLJob``: one RL step (rollouts, rewards, advantages, AEPO, policy update); ``sft.SFTJob``: one SFT step.
- ``step.make_train_step``: micro-batched gradients with the step-wide token-mean denominator, AdamW, non-finite guard.
- ``checkpoint.Checkpointer`` (orbax), ``metrics.MetricsWriter`` (TensorBoard + JSONL), ``plot.plot_run``.
- ``evaluate``: held-out accuracy per task type with 95% intervals.
- ``preflight.preflight``: config, data and tokenizer checks before any compute.

Submodules are imported on use (``import qlx.train`` stays cheap, so ``qlx plot`` starts fast).
"""
