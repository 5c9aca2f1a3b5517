"""Plugin discovery through the ``kdkit`` entry-point group, with fake distributions on sys.path."""
from __future__ import annotations

import json

import pytest

import kdkit
from kdkit.errors import PluginError
from kdkit.plugin.discovery import Plugins, PluginWarning

from conftest import TWO_TEACHER_RECIPE, make_distribution


def test_builtins_register_through_the_entry_point_group():
    plugins = Plugins()
    plugins.load_entry_points()
    assert {"ce", "kl", "hard"} <= set(plugins.names("loss"))
    assert "linear" in plugins.names("head")
    assert "fake" in plugins.names("dataset")
    assert plugins.origins[("loss", "kl")].distribution == "kdkit"


def test_broken_plugin_is_a_warning_and_the_others_work(tmp_path, monkeypatch):
    make_distribution(tmp_path, "kdkit-broken", {"broken_plugin": "raise ImportError('no such thing')"},
                      {"broken": "broken_plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = Plugins()
    with pytest.warns(PluginWarning, match=r"entry point 'broken' .* distribution 'kdkit-broken' failed to load"):
        plugins.load_entry_points()
    assert "kl" in plugins.names("loss")


def test_same_name_from_two_distributions_is_an_error_naming_both(tmp_path, monkeypatch):
    source = """
        from kdkit import api

        def kl():
            '''A rival kl.'''

        @api.hookimpl
        def kdkit_register_losses(registry):
            registry.register_module("kl", module=kl)
        """
    make_distribution(tmp_path, "kdkit-rival", {"rival_plugin": source}, {"rival": "rival_plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = Plugins()
    with pytest.raises(PluginError) as info:
        plugins.load_entry_points()
    message = str(info.value)
    assert "'kl' is registered twice" in message
    assert "distribution 'kdkit'" in message and "distribution 'kdkit-rival'" in message


DECORATED = '''
from kdkit import api


@api.register("loss", "scaled_ce")
def scaled_ce(scale: float = 2.0):
    """Cross-entropy times scale."""
'''


def test_the_register_decorator_is_a_registration_hook_in_short(tmp_path, monkeypatch):
    reexport = "from decorated_plugin import scaled_ce  # another module's factory: registered by its own"
    make_distribution(tmp_path, "kdkit-decorated", {"decorated_plugin": DECORATED, "reexport_plugin": reexport},
                      {"decorated": "decorated_plugin", "reexport": "reexport_plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = Plugins()
    plugins.load_entry_points()
    assert plugins.get("loss", "scaled_ce").__doc__ == "Cross-entropy times scale."
    assert plugins.origins[("loss", "scaled_ce")].entry_point == "decorated"
    row = next(r for r in plugins.describe() if r["name"] == "scaled_ce")
    assert [k["key"] for k in row["keys"]] == ["scale"] and row["distribution"] == "kdkit-decorated"


DECORATOR_MISTAKES = {  # what the DECORATED module gets wrong, and what loading it gives
    "a name another distribution has": (('"scaled_ce")', '"kl")'), lambda: pytest.raises(
        PluginError, match=r"loss plugin 'kl' is registered twice: by .*'kdkit'.* and by .*'kdkit-mistaken'")),
    "a kind that is none": (('"loss"', '"losses"'), lambda: pytest.warns(
        PluginWarning, match=r"no plugin kind 'losses' \(did you mean: loss\?\)")),
}


@pytest.mark.parametrize("mistake", DECORATOR_MISTAKES)
def test_a_decorated_factory_with_a_taken_name_or_no_kind(mistake, tmp_path, monkeypatch):
    (old, new), expected = DECORATOR_MISTAKES[mistake]
    module = f"mistaken_plugin_{list(DECORATOR_MISTAKES).index(mistake)}"  # a module name no other test imported
    make_distribution(tmp_path, "kdkit-mistaken", {module: DECORATED.replace(old, new)}, {"mistaken": module})
    monkeypatch.syspath_prepend(str(tmp_path))
    with expected():
        Plugins().load_entry_points()


def test_dotted_plugin_names_are_refused(tmp_path, monkeypatch):
    source = """
        from kdkit import api

        def f():
            pass

        @api.hookimpl
        def kdkit_register_heads(registry):
            registry.register_module("my.head", module=f)
        """
    make_distribution(tmp_path, "kdkit-dotted", {"dotted_plugin": source}, {"dotted": "dotted_plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="'my.head' .* contains a dot"):
        Plugins().load_entry_points()


def test_plugins_command_lists_kinds_keys_and_distributions(cli):
    result = cli("plugins", "--json")
    assert result.exit_code == 0, result.output
    rows = {(r["kind"], r["name"]): r for r in json.loads(result.stdout)}
    kl = rows[("loss", "kl")]
    assert kl["distribution"] == "kdkit"
    assert {"key": "tau", "type": "float", "range": "> 0", "default": 1.0} in kl["keys"]
    assert ("student", "timm") in rows and ("teacher", "timm") in rows
    table = cli("plugins")
    assert table.exit_code == 0 and "linear" in table.stdout


def kdkit_imports(folder: str) -> list[tuple[str, str]]:
    """(file, module) for every import of kdkit or one of its modules in ``folder``'s Python files."""
    import ast
    from pathlib import Path

    found = []
    for path in sorted((Path(__file__).parents[1] / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] if node.module != "kdkit" else [f"kdkit.{a.name}" for a in node.names]
            else:
                continue
            found += [(path.name, name) for name in names if name == "kdkit" or name.startswith("kdkit.")]
    return found


def test_builtin_plugins_use_only_the_published_api():
    """The built-in plugins import ``kdkit.api`` and nothing else of kdkit, as a third-party plugin would."""
    imports = kdkit_imports("plugins")
    assert imports and all(name == "kdkit.api" for _, name in imports), imports


def test_benchmarks_use_only_the_public_api():
    """The benchmarks build what they time with ``kdkit.build`` and count with ``kdkit.count_flops``, as a user would."""
    imports = kdkit_imports("benchmarks")
    assert imports and all(name == "kdkit" or name in (f"kdkit.{n}" for n in kdkit.__all__) for _, name in imports), \
        imports


def test_the_api_exports_what_it_lists():
    from kdkit import api

    assert all(hasattr(api, name) for name in api.__all__)
    assert all(not name.startswith("_") for name in api.__all__)


MISSPELT_CALLBACK = """
    from kdkit import api

    class Late:
        @api.hookimpl
        def kdkit_epoch_ended(self, trainer, row):
            pass

    def late():
        '''A callback whose hook name is misspelt.'''
        return Late()

    @api.hookimpl
    def kdkit_register_callbacks(registry):
        registry.register_module("late", module=late)
    """


def test_a_misspelt_callback_hook_is_refused_before_anything_is_written(tmp_path, monkeypatch, write_recipe, cli):
    make_distribution(tmp_path, "kdkit-late", {"late_plugin": MISSPELT_CALLBACK}, {"late": "late_plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = Plugins()
    plugins.load_entry_points()
    monkeypatch.setattr("kdkit.train.run.default_plugins", lambda: plugins)
    recipe = write_recipe(TWO_TEACHER_RECIPE + "\n[callbacks.late]\n")
    result = cli("run", recipe, "--out", tmp_path / "out", "--allow-random-teachers")
    assert result.exit_code == 2, result.output
    assert "callback 'late': 'kdkit_epoch_ended' is no kdkit hook (did you mean: kdkit_epoch_end" in result.output
    assert not (tmp_path / "out").exists()


def test_callback_hooks_are_checked_and_unmarked_helpers_ignored():
    from kdkit import api

    class Helpers:
        @api.hookimpl
        def kdkit_epoch_end(self, trainer, row):
            pass

        def kdkit_summary_line(self):  # not marked: the callback's own helper
            pass

    class WrongArgument:
        @api.hookimpl
        def kdkit_epoch_end(self, trainer, rows):
            pass

    plugins = Plugins()
    plugins.check_callbacks({"helpers": Helpers()})
    with pytest.raises(PluginError, match=r"callback 'wrong': .*kdkit_epoch_end\(trainer, rows\).*\{'rows'\}"):
        plugins.check_callbacks({"wrong": WrongArgument()})


@pytest.mark.parametrize("marker", ["@api.hookimpl", ""])
def test_a_misspelt_module_hook_is_the_broken_plugin_warning(tmp_path, monkeypatch, marker):
    source = f"""
        from kdkit import api

        def my_loss():
            '''A loss that never registers.'''

        {marker}
        def kdkit_register_loss(registry):
            registry.register_module("my_loss", module=my_loss)
        """
    make_distribution(tmp_path, "kdkit-misspelt", {"misspelt_plugin": source}, {"misspelt": "misspelt_plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins = Plugins()
    with pytest.warns(PluginWarning, match=r"entry point 'misspelt' .* distribution 'kdkit-misspelt' failed to load "
                      r"and is skipped: PluginError: 'kdkit_register_loss' is no kdkit hook "
                      r"\(did you mean: kdkit_register_losses"):
        plugins.load_entry_points()
    assert "kl" in plugins.names("loss") and "my_loss" not in plugins.names("loss")
    plugins.manager.check_pending()  # the skipped module left no unknown hook behind


def test_a_module_hook_without_its_marker_is_the_broken_plugin_warning(tmp_path, monkeypatch):
    source = """
        def kdkit_register_losses(registry):
            pass
        """
    make_distribution(tmp_path, "kdkit-unmarked", {"unmarked_plugin": source}, {"unmarked": "unmarked_plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(PluginWarning, match=r"'kdkit_register_losses' is not marked @api.hookimpl"):
        Plugins().load_entry_points()
