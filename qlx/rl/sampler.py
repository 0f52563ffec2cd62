"""Task-balanced batches (QwenLong-L1.5 §4.2, the README's DomainSampler) and pass@k difficulty balancing.

Online: every batch holds an equal share of prompts from each task type; the remainder goes one each to the first
tasks (128 prompts over 5 tasks → 26, 26, 26, 25, 25). Each task keeps its own shuffled queue of dataset indices,
reshuffled when exhausted. Every permutation is a pure function of (seed, task, epoch) and every batch shuffle of
(seed, step), so the sampler's whole state is a few integers: ``state_dict()`` is JSON-serialisable and a resumed
run draws exactly the batches the uninterrupted run would have drawn.

Offline: stratify samples into equal-width pass@k bins and draw the same number from every bin.
"""

import math

import numpy as np

_BATCH_STREAM = 0x5EED_BA7C  # separates batch-shuffle streams from per-task permutation streams


def task_counts(batch_size, num_tasks):
    """Prompts per task in one batch: ⌊B / K⌋ each, plus one for each of the first B mod K tasks."""
    if batch_size < 1 or num_tasks < 1:
        raise ValueError(f"batch_size and num_tasks must be >= 1, got {batch_size} and {num_tasks}")
    base, extra = divmod(batch_size, num_tasks)
    return [base + (k < extra) for k in range(num_tasks)]


class TaskBalancedSampler:
    """Infinite iterator of batches of dataset indices with an equal share per task type.

    Args:
      task_types: the task type of every dataset example, e.g. ``[r["task_type"] for r in records]``.
      batch_size: prompts per batch.
      seed: int seed; the same seed, data and state give the same batches.
      tasks: task order (the remainder goes to the first); default: order of first appearance in ``task_types``.
        Every task listed must have an example and every example's task must be listed.
    """

    def __init__(self, task_types, batch_size, *, seed=0, tasks=None):
        task_types = [str(t) for t in task_types]
        self.tasks = list(dict.fromkeys(task_types)) if tasks is None else [str(t) for t in tasks]
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks has duplicates: {self.tasks}")
        unknown = sorted(set(task_types) - set(self.tasks))
        if unknown:
            raise ValueError(f"task_types holds tasks not in tasks={self.tasks}: {unknown}")
        self._members = [np.flatnonzero(np.asarray(task_types, dtype=object) == t) for t in self.tasks]
        empty = [t for t, idx in zip(self.tasks, self._members, strict=True) if idx.size == 0]
        if empty:
            raise ValueError(f"tasks without any example: {empty}")
        self.counts = task_counts(batch_size, len(self.tasks))
        self.batch_size, self.seed, self.dataset_size = int(batch_size), int(seed), len(task_types)
        self._epoch = [0] * len(self.tasks)
        self._pos = [0] * len(self.tasks)
        self._step = 0
        self._perm_cache = {}

    def __len__(self):
        return self.dataset_size // self.batch_size

    def __iter__(self):
        return self

    def _perm(self, k):
        key = (k, self._epoch[k])
        if self._perm_cache.get(k, (None,))[0] != key:
            rng = np.random.default_rng([self.seed, k, self._epoch[k]])
            self._perm_cache[k] = (key, self._members[k][rng.permutation(self._members[k].size)])
        return self._perm_cache[k][1]

    def _take(self, k, count):
        out = []
        while count:
            perm = self._perm(k)
            got = perm[self._pos[k] : self._pos[k] + count]
            out.append(got)
            count -= got.size
            self._pos[k] += got.size
            if self._pos[k] == perm.size:
                self._epoch[k], self._pos[k] = self._epoch[k] + 1, 0
        return out

    def __next__(self):
        parts = [part for k, count in enumerate(self.counts) for part in self._take(k, count)]
        batch = np.concatenate(parts)
        batch = batch[np.random.default_rng([self.seed, _BATCH_STREAM, self._step]).permutation(batch.size)]
        self._step += 1
        return batch.tolist()

    def state_dict(self):
        """JSON-serialisable state: the step and each task's (epoch, position), plus what must match on load."""
        return {
            "step": self._step,
            "epoch": list(self._epoch),
            "pos": list(self._pos),
            "seed": self.seed,
            "tasks": list(self.tasks),
            "batch_size": self.batch_size,
            "task_sizes": [int(idx.size) for idx in self._members],
        }

    def load_state_dict(self, state):
        """Restore ``state_dict()``; the seed, tasks, batch size and per-task sizes must match this sampler."""
        for key in ("seed", "tasks", "batch_size", "task_sizes", "step", "epoch", "pos"):
            if key not in state:
                raise KeyError(f"sampler state lacks {key!r}")
        mine = self.state_dict()
        for key in ("seed", "tasks", "batch_size", "task_sizes"):
            if state[key] != mine[key]:
                raise ValueError(f"sampler state {key!r} is {state[key]!r} but this sampler has {mine[key]!r}")
        if len(state["epoch"]) != len(self.tasks) or len(state["pos"]) != len(self.tasks):
            raise ValueError(f"sampler state 'epoch'/'pos' must have {len(self.tasks)} entries")
        for k, pos in enumerate(state["pos"]):
            if not 0 <= int(pos) < self._members[k].size:
                raise ValueError(f"sampler state 'pos'[{k}] = {pos} is out of range for task {self.tasks[k]!r}")
        self._step = int(state["step"])
        self._epoch = [int(e) for e in state["epoch"]]
        self._pos = [int(p) for p in state["pos"]]


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k) / C(n, k) (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def difficulty_bins(pass_rates, num_bins):
    """Equal-width bin of each pass@k value in [0, 1]: min(⌊p · num_bins⌋, num_bins − 1)."""
    p = np.asarray(pass_rates, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"pass_rates must be 1-D, got shape {p.shape}")
    bad = np.flatnonzero(~((p >= 0) & (p <= 1)))
    if bad.size:
        raise ValueError(f"pass_rates must lie in [0, 1]; index {bad[0]} is {p[bad[0]]}")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    return np.minimum((p * num_bins).astype(np.int64), num_bins - 1)


def balance_by_difficulty(pass_rates, *, num_bins=5, per_bin=None, seed=0):
    """Indices drawing the same number of samples, without replacement, from every non-empty pass@k bin.

    per_bin defaults to the size of the smallest non-empty bin; asking for more than a bin holds is an error.
    Returns (indices sorted ascending, counts per bin) — empty bins show as 0 in the counts.
    """
    bins = difficulty_bins(pass_rates, num_bins)
    members = [np.flatnonzero(bins == b) for b in range(num_bins)]
    sizes = [m.size for m in members]
    nonempty = [s for s in sizes if s]
    if not nonempty:
        return np.zeros(0, np.int64), [0] * num_bins
    per_bin = min(nonempty) if per_bin is None else int(per_bin)
    short = [b for b, s in enumerate(sizes) if 0 < s < per_bin]
    if short:
        raise ValueError(f"per_bin={per_bin} exceeds the size of bins {short} (sizes {sizes})")
    rng = np.random.default_rng(seed)
    picked = [rng.choice(m, per_bin, replace=False) for m in members if m.size]
    return np.sort(np.concatenate(picked)), [per_bin if s else 0 for s in sizes]
