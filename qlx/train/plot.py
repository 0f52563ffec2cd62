"""Curves of a run as PNG files: reward, entropy (with the AEPO band) and response length against step.

Reads ``RUN/metrics.jsonl`` (see :mod:`qlx.train.metrics`); writes ``reward.png``, ``entropy.png``, ``length.png``
(RL runs) and ``loss.png`` (any run with a loss) into ``RUN/plots/`` unless another folder is given.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qlx.train.metrics import read_metrics  # noqa: E402


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
    return [p[0] for p in points], [float(p[1]) for p in points]


def _keys(records: list[dict], prefix: str) -> list[str]:
    return sorted({k for r in records for k in r if k.startswith(prefix)})


def _figure(title: str, ylabel: str):
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, ax, path: Path) -> Path:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_family(records, out: Path, name: str, title: str, ylabel: str, main: str, prefix: str) -> Path | None:
    keys = [k for k in _keys(records, prefix) if k != main]
    if not keys and not any(main in r for r in records):
        return None
    fig, ax = _figure(title, ylabel)
    steps, values = _series(records, main)
    if steps:
        ax.plot(steps, values, color="black", linewidth=2, label=main)
    for key in keys:
        ax.plot(*_series(records, key), linewidth=1, alpha=0.8, label=key)
    return _save(fig, ax, out / name)


def _plot_entropy(records, out: Path) -> Path | None:
    steps, entropy = _series(records, "entropy")
    if not steps:
        return None
    fig, ax = _figure("batch entropy (token mean)", "entropy (nats)")
    ax.plot(steps, entropy, color="tab:blue", linewidth=2, label="entropy")
    for key, style in (("aepo/h_low", "--"), ("aepo/h_high", ":")):
        _, level = _series(records, key)
        if level:
            ax.axhline(level[-1], color="tab:red", linestyle=style, label=key.split("/")[1])
    off_steps, on = _series(records, "aepo/negatives_on")
    for step, value in zip(off_steps, on, strict=True):
        if value == 0:
            ax.axvspan(step - 0.5, step + 0.5, color="tab:red", alpha=0.12, linewidth=0)
    if 0 in on:
        ax.plot([], [], color="tab:red", alpha=0.3, linewidth=6, label="negatives off")
    return _save(fig, ax, out / "entropy.png")


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw the run's curves; returns the PNG paths written."""
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'} has no records yet")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _plot_family(records, out, "reward.png", "reward per task type", "mean reward", "reward/mean", "reward/"),
        _plot_entropy(records, out),
        _plot_family(
            records, out, "length.png", "response length", "tokens", "response_length/mean", "response_length/"
        ),
        _plot_family(records, out, "loss.png", "loss", "loss", "loss", "loss"),
    ]
    return [path for path in written if path is not None]


def plot_accuracy(before, after, path: str | Path) -> Path:
    """Bars of held-out accuracy per task type (and overall) before and after RL, with 95% interval whiskers.

    ``before`` and ``after`` are :class:`qlx.train.evaluate.EvalResult` of the same questions.
    """
    groups = [*before.by_task(), "all"]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    width = 0.38
    for shift, (label, result, color) in zip(
        (-width / 2, width / 2), (("before RL", before, "tab:gray"), ("after RL", after, "tab:blue")), strict=True
    ):
        intervals = [*result.by_task().values(), result.overall()]
        means = [100 * i.mean for i in intervals]
        errors = [[100 * (i.mean - i.low) for i in intervals], [100 * (i.high - i.mean) for i in intervals]]
        ax.bar([x + shift for x in range(len(groups))], means, width, yerr=errors, capsize=3, color=color, label=label)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("accuracy per task type, 95% intervals")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, ax, Path(path))
