"""Runs grouped into one row per recipe (mean ± std over seeds), and paired differences against a baseline."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from kdkit.errors import KdkitError, did_you_mean
from kdkit.tools.compare.runs import Run


@dataclass
class Stat:
    """Mean and sample standard deviation (None below two values) of the values that exist."""

    mean: float | None
    std: float | None
    n: int


def stat(values) -> Stat:
    values = [v for v in values if v is not None]
    mean = statistics.fmean(values) if values else None
    return Stat(mean, statistics.stdev(values) if len(values) > 1 else None, len(values))


@dataclass
class Row:
    """One recipe over its seeds: the final students' test top-1 and what they cost."""

    name: str
    student: dict  # the student table's settings (flattened)
    seeds: list[int]
    test_by_seed: dict[int, float]  # the eval prediction's test top-1 per seed, for paired differences
    test: Stat
    heads_mean: Stat  # the mean of every head's logits (the released code's rule); n = 0 with one head
    best_val: Stat  # the test top-1 of the epoch the validation split chose; n = 0 without one
    heads: dict[str, Stat]
    teachers: dict[str, Stat]
    params: Stat
    flops: Stat
    train_images_per_s: Stat
    infer_images_per_s: Stat
    wall_s: Stat
    flags: list[str]
    teacher_models: dict[str, str] = field(default_factory=dict)  # each teacher's network, when recorded


def summarize(runs: list[Run]) -> list[Row]:
    """Group runs by recipe name (first-seen order) into rows."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.summary.name, []).append(run)
    return [_row(name, group) for name, group in groups.items()]


def _row(name: str, runs: list[Run]) -> Row:
    by_seed: dict[int, Run] = {}
    for run in runs:
        seed = run.summary.seed
        if seed in by_seed:
            raise KdkitError(f"two runs of {name!r} with seed {seed}: {by_seed[seed].path} and {run.path}; "
                             "leave one out, or give one another name (kdkit run -o name=...)")
        by_seed[seed] = run
    seeds = sorted(by_seed)
    summaries = [by_seed[s].summary for s in seeds]
    tests = [s.test_top1 for s in summaries]

    def over(key):
        return stat(getattr(s, key) for s in summaries)

    def per_name(tables):
        names = dict.fromkeys(n for t in tables for n in t)
        return {n: stat(t.get(n) for t in tables) for n in names}

    heads = per_name(tests)
    test, heads_mean = heads.pop("eval"), heads.pop("heads_mean", Stat(None, None, 0))
    flags = [f"{name} seed {seed} ({by_seed[seed].path}): {flag}" for seed in seeds for flag in by_seed[seed].flags]
    return Row(name, student=by_seed[seeds[0]].student, seeds=seeds,
               test_by_seed={seed: t["eval"] for seed, t in zip(seeds, tests)}, test=test, heads_mean=heads_mean,
               best_val=over("best_test_top1"), heads=heads,
               teachers=per_name([s.teacher_top1 for s in summaries]), params=over("params"),
               flops=over("flops"), train_images_per_s=over("train_images_per_s"),
               infer_images_per_s=over("infer_images_per_s"), wall_s=over("wall_s"), flags=flags,
               teacher_models={k: v for s in reversed(summaries) for k, v in s.teacher_models.items()})


@dataclass
class Difference:
    """A recipe's test top-1 minus the baseline's, paired by seed over the seeds both have.

    ``low``/``high``: the 95% Student's t interval of the mean difference; ``p``: the paired t-test's
    two-sided p-value; ``p_holm``: ``p`` adjusted by Holm's step-down method over every difference
    of the comparison that has a p-value (None below two pairs).
    """

    name: str
    baseline: str
    diff: Stat
    seeds: list[int]
    low: float | None = None
    high: float | None = None
    p: float | None = None
    p_holm: float | None = None


def paired_differences(rows: list[Row], baseline: str) -> list[Difference]:
    by_name = {row.name: row for row in rows}
    if baseline not in by_name:
        raise KdkitError(f"--baseline {baseline!r}: no such recipe in the comparison"
                         f"{did_you_mean(baseline, by_name)}; recipes: {', '.join(by_name)}")
    from scipy import stats

    base = by_name[baseline].test_by_seed
    out = []
    for row in rows:
        if row.name == baseline:
            continue
        common = sorted(row.test_by_seed.keys() & base.keys())
        diffs = [row.test_by_seed[s] - base[s] for s in common]
        d = Difference(row.name, baseline, stat(diffs), common)
        if len(diffs) > 1:
            half = stats.t.ppf(0.975, len(diffs) - 1) * d.diff.std / len(diffs) ** 0.5
            d.low, d.high = d.diff.mean - half, d.diff.mean + half
            if d.diff.std > 0:
                d.p = float(stats.ttest_1samp(diffs, 0.0).pvalue)
            else:  # every pair differs by the same amount: nothing to weigh it against
                d.p = 1.0 if d.diff.mean == 0 else 0.0
        out.append(d)
    for d, adjusted in zip(out, holm([d.p for d in out])):
        d.p_holm = adjusted
    return out


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (family-wise error): the k-th smallest of m p-values is multiplied by
    m - k + 1, made non-decreasing, capped at 1. Missing p-values stay missing and do not count in m."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for k, (p, i) in enumerate(present):
        running = max(running, min(1.0, (len(present) - k) * p))
        adjusted[i] = running
    return adjusted
