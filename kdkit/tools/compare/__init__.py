"""``kdkit compare``: recipes side by side over several seeds, as tables, CSV and plots.

One seed says little about a distillation recipe, so a comparison reads several seeds' runs of each
recipe (``seeds``, ``runs``), groups them into rows with paired differences (``stats``) and renders
them (``report``, ``plots``). Everything from run directories to rows, cells and records is a pure
function; the CLI only prints and writes.
"""
