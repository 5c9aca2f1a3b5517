"""A comparison as PNG figures (matplotlib's Figure, no pyplot: no global backend state, renders with Agg)."""
from __future__ import annotations

import statistics
from pathlib import Path

from kdkit.tools.compare.stats import Row


def plot_curves(curves: dict[str, dict[int, list[float]]], path: str | Path) -> None:
    """A PNG of each recipe's validation top-1 after every epoch (``validation_curves``): the mean over seeds
    and their range."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, epochs in curves.items():
        x = sorted(epochs)
        seeds = max(len(values) for values in epochs.values())
        line, = ax.plot(x, [statistics.fmean(epochs[e]) for e in x], label=f"{name} ({seeds} seeds)")
        ax.fill_between(x, [min(epochs[e]) for e in x], [max(epochs[e]) for e in x], color=line.get_color(),
                        alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, format="png", dpi=120)


def plot(rows: list[Row], path: str | Path) -> None:
    """A PNG bar chart: test top-1 mean per recipe with std error bars, teachers' top-1 as markers."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    fig = Figure(figsize=(max(4.0, 1.3 * len(rows) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = list(range(len(rows)))
    ax.bar(x, [row.test.mean for row in rows], yerr=[row.test.std or 0 for row in rows], capsize=5,
           color="tab:blue", label="student test top-1 (mean ± std over seeds)")
    labelled = False
    for i, row in enumerate(rows):
        for name, s in row.teachers.items():
            ax.scatter([i], [s.mean], marker="_", s=500, color="tab:red",
                       label=None if labelled else "teacher top-1", zorder=3)
            ax.annotate(name, (i + 0.42, s.mean), fontsize=7, va="center")
            labelled = True
    ax.set_xticks(x, [f"{row.name}\n({len(row.seeds)} seeds)" for row in rows], fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, format="png", dpi=120)
