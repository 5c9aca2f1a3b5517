"""A comparison as text: the same cells for the terminal and Markdown, and the numbers for the CSV."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from kdkit.tools.compare.stats import Difference, Row, Stat

MARK = "†"  # a run that its recipe, as it is now, or this kdkit would not reproduce


def _pm(s: Stat, signed: bool = False) -> str:
    if s.mean is None:
        return "n/a"
    mean = f"{s.mean:+.2f}" if signed else f"{s.mean:.2f}"
    return f"{mean} ± {s.std:.2f}" if s.std is not None else mean


def _number(s: Stat, fmt: str = "{:.0f}") -> str:
    return "n/a" if s.mean is None else fmt.format(s.mean)


def _si(s: Stat) -> str:
    if s.mean is None:
        return "n/a"
    for factor, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if s.mean >= factor:
            return f"{s.mean / factor:.2f}{unit}"
    return f"{s.mean:.0f}"


def _named(stats: dict[str, Stat], models: dict[str, str]) -> str:
    """``name (network) top-1, ...``: the network when the run recorded it and it is not the name itself."""
    return ", ".join(f"{name}{f' ({models[name]})' if models.get(name, name) != name else ''} "
                     f"{_number(s, '{:.1f}')}" for name, s in stats.items())


def _settings(settings: dict, keys: bool = True) -> str:
    """``key=value, ...`` (or the values alone), lists written ``a+b+c`` so that a narrow column wraps
    between settings."""
    return ", ".join(f"{k + '=' if keys else ''}{'+'.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in settings.items())


@dataclass
class Table:
    """A table as text cells: the terminal and Markdown show the same thing."""

    title: str
    headers: list[str]
    body: list[list[str]]


def student_caption(rows: list[Row]) -> tuple[dict, list[dict]]:
    """The student settings every row shares, and per row the ones that differ."""
    first = rows[0].student if rows else {}
    shared = {k: v for k, v in first.items() if all(k in r.student and r.student[k] == v for r in rows)}
    return shared, [{k: v for k, v in row.student.items() if k not in shared} for row in rows]


def results_table(rows: list[Row]) -> Table:
    """Test top-1 of the final students (mean ± std over seeds), with the teachers and the other rule.
    What every row shares (student settings, the number of seeds) goes in the title rather than a column;
    when the students differ in one setting only, its column is named after it."""
    shared, differing = student_caption(rows)
    keys = list(dict.fromkeys(k for d in differing for k in d))
    seeds = {len(row.seeds) for row in rows}
    selected = any(row.best_val.n for row in rows)
    headers = ["recipe", *([f"student {keys[0]}" if len(keys) == 1 else "student"] if keys else []),
               "teachers (top-1)", "test top-1", "mean of heads", *(["best-val epoch"] if selected else []),
               *(["seeds"] if len(seeds) > 1 else [])]
    body = [[row.name + (f" {MARK}" if row.flags else ""), *([_settings(d, keys=len(keys) > 1)] if keys else []),
             _named(row.teachers, row.teacher_models), _pm(row.test), _pm(row.heads_mean), *([_pm(row.best_val)] if selected else []),
             *([str(len(row.seeds))] if len(seeds) > 1 else [])] for row, d in zip(rows, differing)]
    over = f"{seeds.pop()} seeds" if len(seeds) == 1 else "seeds"
    title = (f"test top-1 (%) of the final students, mean ± std over {over}; student "
             f"{_settings(shared) or '(see the column)'}")
    return Table(title, headers, body)


def cost_table(rows: list[Row]) -> Table:
    return Table("cost per student (FLOPs: multiply-adds per image)", ["recipe", "params", "FLOPs", "train img/s",
                                                                       "infer img/s", "wall s"],
                 [[row.name, _si(row.params), _si(row.flops), _number(row.train_images_per_s),
                   _number(row.infer_images_per_s), _number(row.wall_s)] for row in rows])


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3f}" if p >= 0.001 else "<0.001"


def difference_table(differences: list[Difference]) -> Table:
    baseline = differences[0].baseline if differences else ""
    body = [[d.name, _pm(d.diff, signed=True) if d.seeds else "no common seeds",
             f"[{d.low:+.2f}, {d.high:+.2f}]" if d.low is not None else "n/a", _p(d.p), _p(d.p_holm),
             str(len(d.seeds))] for d in differences]
    return Table(f"test top-1 minus {baseline}'s, paired by seed (95% t interval; p: paired t-test, Holm-adjusted)",
                 ["recipe", f"Δ vs {baseline}", "95% CI", "p", "p (Holm)", "pairs"], body)


def tables(rows: list[Row], differences: list[Difference] = ()) -> list[Table]:
    return [results_table(rows), *([difference_table(differences)] if differences else []), cost_table(rows)]


def footnotes(rows: list[Row]) -> list[str]:
    return [f"{MARK} {flag}" for row in rows for flag in row.flags]


def records(rows: list[Row], differences: list[Difference] = ()) -> list[dict]:
    """The comparison as numbers, one dict per row: the CSV."""
    heads = dict.fromkeys(h for row in rows for h in row.heads)
    teachers = dict.fromkeys(t for row in rows for t in row.teachers)
    by_name = {d.name: d for d in differences}
    out = []
    for row in rows:
        record = {"recipe": row.name, "student": _settings(row.student), "seeds": " ".join(map(str, row.seeds)),
                  "test_top1_mean": row.test.mean, "test_top1_std": row.test.std,
                  "heads_mean_top1_mean": row.heads_mean.mean, "heads_mean_top1_std": row.heads_mean.std,
                  "best_val_epoch_test_top1_mean": row.best_val.mean}
        record.update({f"test_top1_{h}": row.heads[h].mean if h in row.heads else None for h in heads})
        record.update({f"teacher_{t}_top1": row.teachers[t].mean if t in row.teachers else None for t in teachers})
        record.update({f"teacher_{t}_model": row.teacher_models.get(t) for t in teachers})
        for key in ("params", "flops", "train_images_per_s", "infer_images_per_s", "wall_s"):
            record[key] = getattr(row, key).mean
        if differences:
            d = by_name.get(row.name)
            record.update(diff_mean=d and d.diff.mean, diff_std=d and d.diff.std, diff_ci_low=d and d.low,
                          diff_ci_high=d and d.high, diff_p=d and d.p, diff_p_holm=d and d.p_holm,
                          diff_pairs=d and len(d.seeds))
        record["flags"] = "; ".join(row.flags)
        out.append(record)
    return out


def to_csv(rows: list[Row], differences: list[Difference] = ()) -> str:
    table = records(rows, differences)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]) if table else ["recipe"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: csv_value(v) for k, v in record.items()} for record in table)
    return buffer.getvalue()


def csv_value(value) -> str:
    """A CSV cell: empty for a missing number, a float at 12 significant digits (a mean over seeds reads
    20.7, not 20.700000000000003), anything else as it is."""
    if value is None:
        return ""
    return f"{value:.12g}" if isinstance(value, float) else str(value)


def _markdown_table(table: Table) -> list[str]:
    def line(values):
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    return [f"**{table.title}**", "", line(table.headers), line(["---"] * len(table.headers)),
            *map(line, table.body)]


def to_markdown(rows: list[Row], differences: list[Difference] = ()) -> str:
    lines = []
    for table in tables(rows, differences):
        lines += [*_markdown_table(table), ""]
    lines += [f"{note}  " for note in footnotes(rows)]
    return "\n".join(lines).rstrip() + "\n"


# LaTeX's special characters, and the table's symbols in math mode (text mode has no ± or Δ of its own)
LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
         "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "Δ": r"$\Delta$",
         "†": r"$^\dagger$", "‖": r"$\|$", "<": r"$<$", ">": r"$>$"}


def latex_text(text: str) -> str:
    return "".join(LATEX.get(c, c) for c in text)


def _latex_table(table: Table) -> list[str]:
    def line(values):
        return " & ".join(latex_text(v.replace("\n", " ")) for v in values) + r" \\"

    return [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_text(table.title)}}}",
            rf"\begin{{tabular}}{{l{'r' * (len(table.headers) - 1)}}}", r"\toprule", line(table.headers),
            r"\midrule", *map(line, table.body), r"\bottomrule", r"\end{tabular}", r"\end{table}"]


def to_latex(rows: list[Row], differences: list[Difference] = ()) -> str:
    """The tables as LaTeX (booktabs: ``\\usepackage{booktabs}``), one ``table`` each, the footnotes after."""
    lines = []
    for table in tables(rows, differences):
        lines += [*_latex_table(table), ""]
    lines += [latex_text(note) + r" \\" for note in footnotes(rows)]
    return "\n".join(lines).rstrip() + "\n"
