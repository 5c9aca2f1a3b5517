"""A comparison as PNG figures (matplotlib's Figure, no pyplot: no global backend state, renders with Agg)."""
from __future__ import annotations

import statistics
from pathlib import Path

from kdkit.tools.compare.stats import Row


def curves_figure(curves: dict[str, dict[int, list[float]]], splits: set[str]):
    """Each recipe's top-1 after every epoch (``validation_curves``): the mean over seeds and their range.
    ``splits`` are the runs' ``best_selected_on``: without a held-out split the curve is the test split's,
    and the axis says so."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for name, epochs in curves.items():
        x = sorted(epochs)
        seeds = max(len(values) for values in epochs.values())
        line, = ax.plot(x, [statistics.fmean(epochs[e]) for e in x], label=f"{name} ({seeds} seeds)")
        ax.fill_between(x, [min(epochs[e]) for e in x], [max(epochs[e]) for e in x], color=line.get_color(),
                        alpha=0.15)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs are whole, even one
    ax.set_ylabel({frozenset({"validation"}): "validation top-1 (%)",
                   frozenset({"test"}): "test top-1 (%): no held-out validation split"}.get(
                  frozenset(splits), "top-1 (%): held-out validation split, else test split"))
    ax.legend(fontsize=7, loc="lower right")
    return fig


def plot_curves(curves: dict[str, dict[int, list[float]]], splits: set[str], path: str | Path) -> None:
    """``curves_figure`` as a PNG."""
    curves_figure(curves, splits).savefig(path, format="png", dpi=120)


def bars_figure(rows: list[Row]):
    """Test top-1 mean per recipe with std error bars; each teacher's top-1 as a marker of its own colour,
    named in a legend beside the axes (where constrained layout keeps it whole, however long the names)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 1.3 * len(rows) + 2) + 2.5, 4.5), layout="constrained")  # + the legend
    ax = fig.add_subplot()
    x = list(range(len(rows)))
    ax.bar(x, [row.test.mean for row in rows], yerr=[row.test.std or 0 for row in rows], capsize=5,
           color="tab:blue", label="student test top-1\n(mean ± std over seeds)")
    colours = {}
    for i, row in enumerate(rows):
        for name, s in row.teachers.items():
            new = name not in colours
            colours.setdefault(name, f"C{len(colours) + 1}")  # C0 is the bars' blue
            ax.scatter([i], [s.mean], marker="_", s=500, color=colours[name], zorder=3,
                       label=f"teacher {name} top-1" if new else None)
    ax.set_xticks(x, [f"{row.name}\n({len(row.seeds)} seeds)" for row in rows], fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    fig.legend(fontsize=8, loc="outside right upper")
    return fig


def plot(rows: list[Row], path: str | Path) -> None:
    """``bars_figure`` as a PNG."""
    bars_figure(rows).savefig(path, format="png", dpi=120)
