"""``kdkit run --seeds`` and ``kdkit compare``: sibling seed runs, the table and its files, training
only what a recipe lacks, stale-run flags and paired differences."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import kdkit.train.run
from kdkit.cli import COMPARE_WIDTH, _table, app
from kdkit.recipe.toml import load_recipe
from kdkit.store.summary import Summary
from kdkit.tools.compare.report import MARK, csv_value, latex_text, results_table, tables, to_markdown
from kdkit.tools.compare.runs import Run, load_run, validation_curves
from kdkit.tools.compare.seeds import seeded_recipe
from kdkit.tools.compare.stats import paired_differences, summarize

from conftest import TWO_TEACHER_RECIPE

OVERRIDES = ["train.epochs=1", "data.train_size=32"]  # two steps per run: seconds on a CPU
FAST = [arg for o in OVERRIDES for arg in ("-o", o)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def two_teacher_recipe(root: Path) -> Path:
    """conftest's two-teacher recipe as ``root/two.toml`` (its name, ``two``, names the runs)."""
    recipe = root / "two.toml"
    recipe.write_text(TWO_TEACHER_RECIPE)
    return recipe


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory):
    """``kdkit run --seeds 0,1`` once, shared: the recipe, its two run directories and the CLI output."""
    root = tmp_path_factory.mktemp("seeds")
    recipe = two_teacher_recipe(root)
    result = CliRunner().invoke(app, ["run", "--seeds", "0,1", str(recipe), "--out", str(root / "two"), *FAST,
                                      "--allow-random-teachers"])
    assert result.exit_code == 0, result.output
    return recipe, [root / "two" / "seed0", root / "two" / "seed1"], result.output


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_seeds_make_sibling_run_directories(seed_runs):
    recipe, dirs, output = seed_runs
    assert output.strip().splitlines()[-2:] == [str(d) for d in dirs]
    for seed, run_dir in enumerate(dirs):
        s = summary(run_dir)
        assert s["status"] == "completed" and s["seed"] == seed and s["name"] == "two"
        assert s["recipe_hash"] == seeded_recipe(recipe, OVERRIDES, seed).hash()
        assert f"seed = {seed}" in (run_dir / "recipe.toml").read_text()


def test_compare_prints_and_writes_the_table(seed_runs, cli, tmp_path):
    _, dirs, _ = seed_runs
    files = {"csv": tmp_path / "t.csv", "markdown": tmp_path / "md" / "t.md", "plot": tmp_path / "t.png",
             "curves": tmp_path / "curves.png", "latex": tmp_path / "t.tex"}
    result = cli("compare", *dirs, *(arg for kind, path in files.items() for arg in (f"--{kind}", path)))
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 100  # reads in a 100-column terminal
    summaries = [summary(d) for d in dirs]
    tests = [s["test_top1"]["eval"] for s in summaries]
    assert tests == [s["top1"]["eval"] for s in summaries]  # no held-out split: validation is the test split
    cell = f"{statistics.fmean(tests):.2f} ± {statistics.stdev(tests):.2f}"
    assert cell in result.output and MARK not in result.output

    [row] = list(csv.DictReader(files["csv"].open()))
    assert row["recipe"] == "two" and row["seeds"] == "0 1" and row["flags"] == ""
    assert float(row["test_top1_mean"]) == pytest.approx(statistics.fmean(tests))
    assert float(row["test_top1_std"]) == pytest.approx(statistics.stdev(tests))
    assert row["best_val_epoch_test_top1_mean"] == ""  # no validation split chose an epoch
    assert csv_value(20.700000000000003) == "20.7" and csv_value(1.5e-9) == "1.5e-09" and csv_value(12) == "12"
    assert csv_value(1_268_230_000.0) == "1268230000" and csv_value("a b") == "a b" and csv_value(None) == ""
    for column, values in {"heads_mean_top1_mean": [s["test_top1"]["heads_mean"] for s in summaries],
                           "test_top1_conv": [s["test_top1"]["conv"] for s in summaries],
                           "teacher_other_top1": [s["teacher_top1"]["other"] for s in summaries],
                           "params": [s["params"] for s in summaries],
                           "train_images_per_s": [s["train_images_per_s"] for s in summaries]}.items():
        assert float(row[column]) == pytest.approx(statistics.fmean(values)), column

    assert files["plot"].read_bytes()[:8] == files["curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    markdown = files["markdown"].read_text()
    assert "student plugin=timm, model=test_vit, model_kwargs.img_size=32" in markdown  # shared: a caption
    assert "mean ± std over 2 seeds" in markdown  # every row has 2: no seeds column
    assert "| recipe | teachers (top-1) | test top-1 | mean of heads |" in markdown
    assert "| two | conv (test_resnet) " in markdown and ", other (test_efficientnet) " in markdown and cell in markdown
    assert row["teacher_conv_model"] == "test_resnet" and summaries[0]["teacher_models"]["other"] == "test_efficientnet"
    latex = files["latex"].read_text()
    assert latex.count(r"\begin{tabular}") == 2 and latex.count(r"\toprule") == 2  # results and cost
    assert r"\caption{test top-1 (\%) of the final students, mean $\pm$ std over 2 seeds" in latex
    assert cell.replace("±", r"$\pm$") in latex and r"model\_kwargs.img\_size=32" in latex
    assert latex_text(r"a_b & 5% {x} ^~\ Δ†") == (r"a\_b \& 5\% \{x\} \textasciicircum{}\textasciitilde{}\textbackslash{} "
                                                r"$\Delta$$^\dagger$")

    folder = cli("compare", dirs[0].parent, "--csv", tmp_path / "folder.csv")  # the folder of kdkit run --seeds
    assert folder.exit_code == 0, folder.output
    assert (tmp_path / "folder.csv").read_text() == files["csv"].read_text()


def test_compare_trains_only_what_a_recipe_lacks(seed_runs, cli, tmp_path, monkeypatch):
    recipe, dirs, _ = seed_runs
    runs = tmp_path / "runs"
    shutil.copytree(dirs[0], runs / "two" / "seed0")  # seed 0 of the same recipe exists; seed 1 does not
    seed0 = runs / "two" / "seed0" / "summary.json"
    before = seed0.stat().st_mtime_ns
    trained = []
    real_run = kdkit.train.run.run

    def counting_run(recipe_path, overrides, out, **options):
        trained.append(Path(out).name)
        return real_run(recipe_path, overrides, out, **options)

    monkeypatch.setattr(kdkit.train.run, "run", counting_run)
    args = ("compare", recipe, "--seeds", "0,1", "--runs", runs, *FAST, "--allow-random-teachers")
    first = cli(*args)
    assert first.exit_code == 0, first.output
    assert trained == ["seed1"] and seed0.stat().st_mtime_ns == before
    assert summary(runs / "two" / "seed1")["status"] == "completed"
    assert MARK not in first.output  # both runs carry the hash of the recipe as it is now

    def fake_run(recipe_path, overrides, out, *, force, resume, **options):  # stands in for a retrain
        trained.append((Path(out).name, "resume" if resume else "force" if force else "new"))
        shutil.copytree(dirs[0], out, dirs_exist_ok=True)
        return out

    monkeypatch.setattr(kdkit.train.run, "run", fake_run)
    assert cli(*args).exit_code == 0 and trained == ["seed1"]  # everything complete: nothing trains
    interrupted = {**summary(runs / "two" / "seed0"), "status": "interrupted"}
    seed0.write_text(json.dumps(interrupted))
    third = cli(*args)
    assert third.exit_code == 0, third.output
    assert trained == ["seed1", ("seed0", "resume")]  # only the unfinished run, resumed from its checkpoint
    seed0.write_text(json.dumps(interrupted))
    (runs / "two" / "seed0" / "checkpoints" / "last.pt").unlink()
    assert cli(*args).exit_code == 0
    assert trained[-1] == ("seed0", "force")  # no checkpoint to resume from: started over


def test_a_plain_run_is_seed_0_of_a_recipe_that_names_no_seed(cli, tmp_path, monkeypatch):
    recipe = tmp_path / "two.toml"
    recipe.write_text(TWO_TEACHER_RECIPE.replace("\nseed = 0\n", "\n"))
    assert "seed" not in load_recipe(recipe).table
    made = cli("run", recipe, "--out", tmp_path / "runs" / "two" / "seed0", *FAST, "--allow-random-teachers")
    assert made.exit_code == 0, made.output
    monkeypatch.setattr(kdkit.train.run, "run", lambda *args, **kwargs: pytest.fail("compare retrained the run"))
    result = cli("compare", recipe, "--runs", tmp_path / "runs", *FAST)
    assert result.exit_code == 0, result.output
    assert MARK not in result.output  # the hash the run recorded is the one compare expects


def test_resuming_seeds_checks_every_run_before_the_first_resumes(seed_runs, cli, tmp_path):
    recipe, dirs, _ = seed_runs
    shutil.copytree(dirs[0], tmp_path / "two" / "seed0")  # seed 1 has nothing to resume
    before = (tmp_path / "two" / "seed0" / "summary.json").read_bytes()
    result = cli("run", "--seeds", "0,1", recipe, "--out", tmp_path / "two", "--resume", *FAST,
                 "--allow-random-teachers")
    assert result.exit_code == 2 and "seed1: nothing to resume" in result.output
    assert (tmp_path / "two" / "seed0" / "summary.json").read_bytes() == before


def test_stale_runs_are_flagged(seed_runs, cli, tmp_path):
    _, dirs, _ = seed_runs
    stale = tmp_path / "stale"
    shutil.copytree(dirs[0], stale)
    edited = {**summary(stale), "recipe_hash": "0" * 16, "kdkit_version": "0.0.1"}
    (stale / "summary.json").write_text(json.dumps(edited))
    result = cli("compare", stale, "--csv", tmp_path / "t.csv", "--markdown", tmp_path / "t.md")
    assert result.exit_code == 0, result.output
    assert f"two {MARK}" in result.output and "recipe hash 0000000000000000" in result.output
    assert "made by kdkit 0.0.1" in result.output
    [row] = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert "recipe hash 0000000000000000" in row["flags"] and "kdkit 0.0.1" in row["flags"]
    assert f"{MARK} two seed 0" in (tmp_path / "t.md").read_text()


def test_bad_input_exits_2(seed_runs, cli, tmp_path):
    recipe, dirs, _ = seed_runs
    (tmp_path / "empty").mkdir()
    keep = tmp_path / "runs" / "two" / "seed0" / "keep.txt"  # not a run: compare must not overwrite it
    keep.parent.mkdir(parents=True)
    keep.write_text("x")
    (tmp_path / "notes.txt").write_text("x")
    shutil.copytree(dirs[0], tmp_path / "broken")
    (tmp_path / "broken" / "summary.json").write_text(json.dumps({**summary(dirs[0]), "status": "failed"}))
    shutil.copytree(dirs[0], tmp_path / "starting")  # stopped before its first epoch: no top-1 yet
    (tmp_path / "starting" / "summary.json").write_text(json.dumps({**summary(dirs[0]), "status": "running",
                                                                    "top1": {}}))
    namesake = tmp_path / "namesake.toml"  # another recipe whose runs are also named "two"
    namesake.write_text('name = "two"\n' + recipe.read_text().replace("train_size = 64", "train_size = 48"))
    cases = {
        (tmp_path / "missing",): "no such run directory or recipe file",
        (tmp_path / "empty",): "not a run directory",
        (tmp_path / "notes.txt",): "neither a run directory nor a recipe",
        (tmp_path / "broken",): "the run is failed, not completed",
        (tmp_path / "starting",): "the run is running, not completed",
        (recipe, namesake, "--runs", tmp_path / "runs"): "both name their runs 'two'",
        (*dirs, "--seeds", "0,x"): "expected comma-separated integers",
        (*dirs, "--baseline", "tw"): "no such recipe in the comparison (did you mean: two?)",
        (recipe, "--runs", tmp_path / "runs", "--allow-random-teachers"): "not a kdkit run directory",
    }
    for args, message in cases.items():
        result = cli("compare", *args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert keep.read_text() == "x"


def fabricated(name: str, seed: int, test: float, tokens=("cls",), teachers=("conv",), best=None) -> Run:
    s = {"name": name, "seed": seed, "status": "completed", "top1": {"cls": 0.0, "eval": 0.0},
         "test_top1": {"cls": test - 1, "eval": test, "heads_mean": test + 0.5}, "best_test_top1": best,
         "teacher_top1": {t: 50.0 + i for i, t in enumerate(teachers)}, "params": 1000, "flops": None,
         "train_images_per_s": 10.0, "infer_images_per_s": 100.0, "wall_s": 5.0}
    return Run(Path(f"runs/{name}/seed{seed}"), Summary.from_json(s, "fabricated"),
               {"plugin": "vit", "depth": 4, "tokens": list(tokens)}, [])


def test_rows_and_paired_differences_by_hand():
    runs = [fabricated("base", 0, 70.0), fabricated("base", 1, 72.0), fabricated("base", 2, 74.0),
            fabricated("new", 1, 75.0), fabricated("new", 0, 71.0), fabricated("new", 3, 80.0),
            fabricated("other", 9, 60.0),
            *(fabricated("third", seed, v, ("cls", "conv")) for seed, v in enumerate((71.0, 74.0, 75.0)))]
    base, new, other, third = summarize(runs)
    assert base.seeds == [0, 1, 2] and base.test.mean == 72.0 and base.test.std == pytest.approx(2.0)
    assert base.heads["cls"].mean == 71.0 and base.heads_mean.mean == 72.5 and base.flops.mean is None
    assert other.test.std is None and other.test.n == 1 and base.best_val.n == 0

    to_new, to_other, to_third = paired_differences([base, new, other, third], "base")
    # new shares seeds 0 and 1: 71 - 70 = 1 and 75 - 72 = 3; t = 2 with 1 degree of freedom
    assert to_new.name == "new" and to_new.seeds == [0, 1]
    assert to_new.diff.mean == pytest.approx(2.0) and to_new.diff.std == pytest.approx(2 ** 0.5)
    assert (to_new.low, to_new.high) == pytest.approx((2 - 12.7062, 2 + 12.7062), abs=1e-3)
    assert to_new.p == pytest.approx(1 - 2 / math.pi * math.atan(2.0))  # 0.2952
    # third: differences 1, 2, 1; mean 4/3, standard error 1/3, t = 4 with 2 degrees of freedom
    assert to_third.p == pytest.approx(1 - 4 / math.sqrt(18))  # 0.0572
    assert (to_third.low, to_third.high) == pytest.approx((4 / 3 - 4.3027 / 3, 4 / 3 + 4.3027 / 3), abs=1e-3)
    # Holm over the two p-values: the smaller doubled, the larger kept (and never below the smaller's)
    assert to_third.p_holm == pytest.approx(2 * to_third.p) and to_new.p_holm == pytest.approx(to_new.p)
    assert to_other.seeds == [] and to_other.diff.mean is None and to_other.p_holm is None

    markdown = to_markdown([base, new, other, third], [to_new, to_other, to_third])
    assert "student plugin=vit, depth=4" in markdown  # shared settings go to the caption...
    assert "| recipe | student tokens | teachers (top-1) | test top-1 | mean of heads | seeds |" in markdown
    assert "| base | cls | conv 50.0 | 72.00 ± 2.00 | 72.50 ± 2.00 | 3 |" in markdown  # ...the rest stays
    assert "| new | +2.00 ± 1.41 | [-10.71, +14.71] | 0.295 | 0.295 | 2 |" in markdown
    assert "| third | +1.33 ± 0.58 | [-0.10, +2.77] | 0.057 | 0.114 | 3 |" in markdown
    assert "| other | no common seeds | n/a | n/a | n/a | 0 |" in markdown


def test_the_study_table_reads_in_100_columns_with_every_number_whole():
    """Eight rows as in docs/results/cifar10-v2: the longest recipe names, tokens and teacher lists."""
    rows = {"no_kd": ((), ()), "conv_only": (("conv",), ("conv",)), "two_conv": (("conv", "conv2"),) * 2,
            "one_token_mean_prob": ((), ("conv", "inv")), "civt": (("conv", "inv"),) * 2,
            "two_inv": (("inv", "inv2"),) * 2}
    runs = [fabricated(name, seed, 50.0 + seed, ("cls", *tokens), teachers, best=50.25 + seed)
            for name, (tokens, teachers) in rows.items() for seed in range(5)]
    summarized = summarize(runs)
    results = results_table(summarized)
    assert results.headers[1] == "student tokens" and "best-val epoch" in results.headers
    assert "seeds" not in results.headers  # 5 seeds each: in the title
    assert "mean ± std over 5 seeds; student plugin=vit, depth=4" in results.title
    console = Console(width=COMPARE_WIDTH, record=True)
    for table in tables(summarized, paired_differences(summarized, "civt")):
        console.print(_table(table))
    text = console.export_text()
    borders = [line for line in text.splitlines() if line[:1] in "┏┃┡│└"]
    assert all(line[-1] in "┓┃┩│┘" for line in borders)  # a table too wide loses its right edge
    lines = [line for line in text.splitlines() if "two_conv" in line]
    assert "cls+conv+conv2" in lines[0] and "52.00 ± 1.58" in lines[0] and "52.25 ± 1.58" in lines[0]
    assert "+0.00 ± 0.00" in lines[1] and "one_token_mean_prob" in text


def test_validation_curves_gather_every_epoch_of_every_seed(seed_runs):
    _, dirs, _ = seed_runs
    runs = [load_run(d) for d in dirs]
    by_hand: dict[int, list[float]] = {}
    for d in dirs:
        for line in (d / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            by_hand.setdefault(row["epoch"], []).append(row["top1"]["eval"])
    assert validation_curves(runs) == {"two": by_hand} and all(len(v) == 2 for v in by_hand.values())

    from kdkit.tools.compare.plots import curves_figure

    ax = curves_figure(validation_curves(runs), {r.summary.best_selected_on for r in runs}).axes[0]
    assert ax.get_ylabel() == "test top-1 (%): no held-out validation split"  # the recipe holds none out
    ax.figure.canvas.draw()
    assert all(tick == int(tick) for tick in ax.get_xticks())  # whole epochs
    assert curves_figure({"a": {1: [50.0]}}, {"validation"}).axes[0].get_ylabel() == "validation top-1 (%)"


def test_the_bar_chart_shows_every_teacher_name_whole(seed_runs):
    from kdkit.tools.compare.plots import bars_figure

    _, dirs, _ = seed_runs
    rows = summarize([load_run(d) for d in dirs])
    long = {f"{name}_teacher_of_a_long_name": s for name, s in rows[0].teachers.items()}
    rows = [dataclasses.replace(rows[0], name=name, teachers=long) for name in ("a", "b")]
    fig = bars_figure(rows)
    fig.canvas.draw()
    [legend] = fig.legends
    names = {text.get_text() for text in legend.get_texts()}
    assert names == {"student test top-1\n(mean ± std over seeds)", *(f"teacher {name} top-1" for name in long)}
    box = legend.get_window_extent()
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1  # whole, not clipped at the right edge


def test_holm_by_hand():
    from kdkit.tools.compare.stats import holm

    assert holm([0.01, 0.04, None, 0.03]) == pytest.approx([0.03, 0.06, None, 0.06])
    assert holm([0.5, 0.9]) == [1.0, 1.0]


def test_two_runs_of_one_recipe_and_seed_are_refused():
    from kdkit.errors import KdkitError

    with pytest.raises(KdkitError, match="two runs of 'a' with seed 0"):
        summarize([fabricated("a", 0, 1.0), fabricated("a", 0, 2.0)])
