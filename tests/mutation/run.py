"""Mutation testing of kdkit's numerical core with cosmic-ray: can the tests catch plausible bugs?

    python -m pip install -e '.[test,mutation]'
    python tests/mutation/run.py [GROUP ...]          # every group of pyproject.toml by default
    python tests/mutation/run.py --recheck [GROUP ...] # run the unexplained survivors again (new tests)

Each group of ``[tool.kdkit.mutation]`` in pyproject.toml names modules and the tests that cover them.
cosmic-ray mutates one place at a time (an operator, a number, a condition...) **in the files of this
checkout**, runs the tests, and restores the file: run it in a clone you are not editing. A mutant
the tests let pass *survives*. The session of each group lives in ``.mutation/<group>.sqlite``, so an
interrupted run continues where it stopped and a second run only reports; a session whose modules
were edited since is started over.

The score counts, per group and overall, killed / (killed + survived) mutants; a survivor listed in
``tests/mutation/equivalent.txt`` (a mutation that cannot change behaviour, with the reason) counts
apart. Survivors not listed there are written to ``.mutation/<group>.survivors`` for a look.
"""
from __future__ import annotations

import functools
import shlex
import sqlite3
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".mutation"
EQUIVALENT = Path(__file__).with_name("equivalent.txt")


def config_text(group: dict, settings: dict) -> str:
    """A cosmic-ray configuration for one group (cosmic-ray reads its own top-level table)."""
    def quoted(items):
        return "[" + ", ".join('"' + i.replace("\\", "\\\\") + '"' for i in items) + "]"

    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *group["tests"]]
    return "\n".join([
        "[cosmic-ray]", f"module-path = {quoted(group['modules'])}", f"timeout = {settings['timeout']}",
        "excluded-modules = []", f"test-command = {quoted([shlex.join(command)])[1:-1]}",
        "[cosmic-ray.distributor]", 'name = "local"',
        "[cosmic-ray.filters.operators-filter]", f"exclude-operators = {quoted(settings['exclude-operators'])}",
    ]) + "\n"


def equivalent_entries() -> list[tuple[str, str, str, str]]:
    """The survivors accepted as equivalent, one per line: ``module | operator | source line | why``
    (the source line may itself hold " | ", a reason may not)."""
    entries = []
    for line in EQUIVALENT.read_text().splitlines() if EQUIVALENT.is_file() else []:
        if line.strip() and not line.startswith("#"):
            rest, why = line.rsplit(" | ", 1)
            module, operator, source = rest.split(" | ", 2)
            entries.append((module.strip(), operator.strip(), source.strip(), why.strip()))
    return entries


def equivalents() -> set[tuple[str, str, str]]:
    """(module, operator, source line) of each accepted equivalent."""
    return {entry[:3] for entry in equivalent_entries()}


@functools.cache
def module_lines(module: str) -> list[str]:
    return (ROOT / module).read_text().splitlines()


def source_line(module: str, row: int) -> str:
    return module_lines(module)[row - 1].strip()


def forget_survivors(session: Path) -> None:
    """Drop the results of the survivors not listed as equivalent, so that the next exec runs them again."""
    db = sqlite3.connect(session)
    accepted = equivalents()
    rows = db.execute("select r.job_id, s.module_path, s.operator_name, s.start_pos_row from mutation_specs s "
                      "join work_results r on s.job_id = r.job_id where r.test_outcome = 'SURVIVED'").fetchall()
    again = [(job,) for job, module, operator, row in rows if (module, operator, source_line(module, row)) not in accepted]
    db.executemany("delete from work_results where job_id = ?", again)
    db.commit()
    print(f"{session.stem}: {len(again)} survivors to run again", flush=True)


def mutation_specs(session: Path) -> set[tuple]:
    """Each mutant of a session by where it applies: cosmic-ray stores them by position and occurrence."""
    db = sqlite3.connect(session)
    specs = set(db.execute("select module_path, operator_name, occurrence, start_pos_row, start_pos_col "
                           "from mutation_specs"))
    db.close()
    return specs


def initialise(config: Path, draft: Path) -> None:
    """A new session of every mutant the group's modules hold now (the excluded operators marked skipped)."""
    draft.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "cosmic_ray.cli", "init", str(config), str(draft)], check=True, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "cosmic_ray.tools.filters.operators_filter", str(draft), str(config)],
                   check=True, cwd=ROOT)


def run_group(group: dict, settings: dict, recheck: bool = False) -> tuple[int, int, int, list[str]]:
    """Run (or continue) one group's session; (killed, survived, equivalent, unexplained survivors).

    A session whose modules changed since it began is started over: cosmic-ray applies a mutant by its
    occurrence in the file, so after an edit its stored results would describe other places."""
    WORK.mkdir(exist_ok=True)
    config, session = WORK / f"{group['name']}.toml", WORK / f"{group['name']}.sqlite"
    config.write_text(config_text(group, settings))
    draft = session.with_suffix(".draft")  # initialised under another name, so that an interrupted init is redone
    initialise(config, draft)
    if session.is_file() and mutation_specs(session) != mutation_specs(draft):
        print(f"{group['name']}: its modules changed since its session began: starting it over", flush=True)
        session.unlink()
    if session.is_file():
        draft.unlink()
        if recheck:
            forget_survivors(session)
    else:
        draft.rename(session)
    subprocess.run([sys.executable, "-m", "cosmic_ray.cli", "exec", str(config), str(session)], check=True, cwd=ROOT)
    rows = sqlite3.connect(session).execute(
        "select s.module_path, s.operator_name, s.start_pos_row, r.test_outcome, r.worker_outcome "
        "from mutation_specs s join work_results r on s.job_id = r.job_id").fetchall()
    accepted = equivalents()
    killed = survived = equivalent = 0
    unexplained = []
    for module, operator, row, test_outcome, worker_outcome in rows:
        test_outcome, worker_outcome = str(test_outcome).lower(), str(worker_outcome).lower()
        if worker_outcome != "normal" or test_outcome == "incompetent":
            continue  # skipped by the filter, or a mutation that could not be run
        if test_outcome == "killed":  # a failing test, or one that ran past the timeout
            killed += 1
            continue
        source = source_line(module, row)
        if (module, operator, source) in accepted:
            equivalent += 1
        else:
            survived += 1
            unexplained.append(f"{module}:{row} | {operator} | {source}")
    (WORK / f"{group['name']}.survivors").write_text("".join(line + "\n" for line in unexplained))
    return killed, survived, equivalent, unexplained


def main(args: list[str]) -> int:
    recheck = "--recheck" in args
    names = [a for a in args if a != "--recheck"]
    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["kdkit"]["mutation"]
    groups = [g for g in settings["groups"] if not names or g["name"] in names]
    total = [0, 0, 0]
    for group in groups:
        start = time.perf_counter()
        killed, survived, equivalent, _ = run_group(group, settings, recheck)
        total = [t + n for t, n in zip(total, (killed, survived, equivalent))]
        print(f"{group['name']:>10}: {killed} killed, {survived} survived, {equivalent} equivalent: "
              f"{killed / max(killed + survived, 1):.1%} of the others killed "
              f"({(time.perf_counter() - start) / 60:.0f} min this time)", flush=True)
    killed, survived, equivalent = total
    print(f"{'all':>10}: {killed} killed, {survived} survived, {equivalent} equivalent: "
          f"{killed / max(killed + survived, 1):.1%} killed (survivors: .mutation/*.survivors)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
