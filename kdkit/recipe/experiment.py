"""From a resolved recipe to a checked ``Experiment``: every key, type, plugin name and reference.

What the recipe alone can get wrong is refused here, before any data is read; what only the built
parts can tell (the data's size, the student's outputs, teacher weights) ``kdkit.builder.parts`` checks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from timm.optim import list_optimizers

from kdkit.errors import RecipeError, did_you_mean
from kdkit.plugin.discovery import Plugins, default_plugins
from kdkit.recipe import sections
from kdkit.recipe.schema import OutOfRange, Range, accepts, check_table, conform, type_name
from kdkit.recipe.toml import Recipe
from kdkit.store.rundir import check_name


@dataclass
class PluginSpec:
    """One plugin table, checked against its factory's signature."""

    kind: str
    plugin: str
    kwargs: dict
    key: str

    def call_kwargs(self, plugins: Plugins, **context) -> dict:
        """The factory's arguments: the recipe's keys, and context values for keys it takes and the recipe left unset."""
        factory = plugins.get(self.kind, self.plugin)
        extra = {k: v for k, v in context.items() if accepts(factory, k) and k not in self.kwargs}
        return {**self.kwargs, **extra}

    def build(self, plugins: Plugins, **context):
        return plugins.get(self.kind, self.plugin)(**self.call_kwargs(plugins, **context))


@dataclass
class TeacherSpec:
    name: str
    spec: PluginSpec | None  # None when the checkpoint is a kdkit export, which carries its own model
    checkpoint: str = ""
    pretrained: bool = False
    precision: str = "auto"
    recipe: Recipe | None = None  # the recipe that trains this teacher, when it is not trained yet
    classes: list[str] | None = None  # the teacher's classes in its output order, when the recipe names them
    compile: bool = False  # torch.compile its forward
    mean: list[float] | None = None  # the input normalization its weights were trained with, when not the data's
    std: list[float] | None = None
    input_size: int | None = None  # the image side it is fed (resized to), when not the data's


@dataclass
class HeadSpec:
    name: str
    spec: PluginSpec
    embedding: str


@dataclass
class LossTerm:
    """One weighted entry of ``[[losses]]``: a loss on one head, taught by zero or more teachers."""

    name: str  # the name of this term in logs and metrics, e.g. "kl/conv"
    spec: PluginSpec  # the plugin and its checked keys
    fn: object  # the built loss: building one is cheap and tells whether it needs teachers
    head: str
    teachers: list[str]
    weight: float


@dataclass
class Experiment:
    recipe: Recipe
    name: str
    seed: int
    data: sections.DataConfig
    dataset: PluginSpec
    student: PluginSpec
    teachers: dict[str, TeacherSpec]
    heads: dict[str, HeadSpec]
    losses: list[LossTerm]
    train: sections.TrainConfig
    augment: sections.AugmentConfig
    eval: sections.EvalConfig
    callbacks: dict[str, PluginSpec] = field(default_factory=dict)
    teacher_cache: sections.CacheSettings | None = None  # read the teachers' outputs from a cache of views
    student_checkpoint: str = ""  # weights to start the student and its heads from

    @property
    def needed_teachers(self) -> list[str]:
        """The teachers some loss learns from, sorted: the ones a run builds."""
        return sorted({t for loss in self.losses for t in loss.teachers})


def _table(recipe: Recipe, key: str, value, *, required: bool = False) -> dict:
    if value is None:
        if required:
            raise recipe.error(key, "missing required table")
        return {}
    if not isinstance(value, dict):
        raise recipe.error(key, f"expected a table, got {type(value).__name__} {value!r}")
    return value


def _checked(recipe: Recipe, factory, table: dict, *, kind: str, key: str, core_keys=()) -> dict:
    try:
        return check_table(factory, table, kind=kind, file=None, key=key, core_keys=core_keys)
    except RecipeError as exc:
        raise recipe.error(exc.key, exc.message) from None


def _plugin_spec(recipe, plugins, kind, table, key, core_keys, default_plugin=None) -> PluginSpec:
    name = table.get("plugin", default_plugin)
    if name is None:
        raise recipe.error(f"{key}.plugin", f"missing required key: which {kind} plugin "
                           f"(one of {', '.join(plugins.names(kind))})")
    if not isinstance(name, str) or name not in plugins.names(kind):
        raise recipe.error(f"{key}.plugin", f"no {kind} plugin named {name!r}"
                           f"{did_you_mean(str(name), plugins.names(kind))}; "
                           f"installed: {', '.join(plugins.names(kind)) or '(none)'}")
    own = {k: v for k, v in table.items() if k not in core_keys}
    kwargs = _checked(recipe, plugins.get(kind, name), own, kind=kind, key=key, core_keys=core_keys)
    return PluginSpec(kind, name, kwargs, key)


def _core(recipe, cls, table: dict, key: str, *, keep: set = frozenset()):
    """Check a section's core keys against its dataclass; ``keep`` keys belong to a plugin."""
    core = {k: v for k, v in table.items() if k not in keep}
    return cls(**_checked(recipe, cls, core, kind="config", key=key))


def _typed(recipe, key: str, value, annotation, default):
    if value is None:
        return default
    try:
        ok, converted = conform(value, annotation)
    except OutOfRange as exc:
        raise recipe.error(key + exc.path, exc.message) from None
    if not ok:
        raise recipe.error(key, f"expected {type_name(annotation)}, got {type(value).__name__} {value!r}")
    return converted


def resolve(recipe: Recipe, plugins: Plugins | None = None, *, allow_random_teachers: bool = False) -> Experiment:
    """Check every key of ``recipe`` and return the experiment it describes.

    Nothing is read or trained; loss functions are built (cheaply) to ask whether they need teachers.
    """
    plugins = plugins or default_plugins()
    t = recipe.table
    for key in t:
        if key not in sections.TOP_LEVEL_KEYS:
            raise recipe.error(key, f"unknown top-level key{did_you_mean(key, sections.TOP_LEVEL_KEYS)}; "
                               f"valid: {', '.join(sorted(sections.TOP_LEVEL_KEYS))}")
    name = _typed(recipe, "name", t.get("name"), str, recipe.path.stem)
    if why := check_name(name):
        raise recipe.error("name", why)
    seed = _typed(recipe, "seed", t.get("seed"), Annotated[int, Range(ge=0)], 0)

    data_table = _table(recipe, "data", t.get("data"))
    core_data = set(sections.DataConfig.__dataclass_fields__)
    data = _core(recipe, sections.DataConfig, data_table, "data", keep=data_table.keys() - core_data)
    if data.dataset not in plugins.names("dataset"):
        raise recipe.error("data.dataset", f"no dataset plugin named {data.dataset!r}"
                           f"{did_you_mean(data.dataset, plugins.names('dataset'))}; "
                           f"installed: {', '.join(plugins.names('dataset'))}")
    own_data = {k: v for k, v in data_table.items() if k not in core_data}
    dataset = _plugin_spec(recipe, plugins, "dataset", {"plugin": data.dataset, **own_data}, "data", {"plugin"})

    train = _core(recipe, sections.TrainConfig, _table(recipe, "train", t.get("train")), "train")
    augment = _core(recipe, sections.AugmentConfig, _table(recipe, "augment", t.get("augment")), "augment")
    evaluation = _core(recipe, sections.EvalConfig, _table(recipe, "eval", t.get("eval")), "eval")
    _check_train(recipe, data, train, augment)

    student_table = _table(recipe, "student", t.get("student"), required=True)
    student = _plugin_spec(recipe, plugins, "student", student_table, "student", sections.STUDENT_KEYS)
    student_checkpoint = _typed(recipe, "student.checkpoint", student_table.get("checkpoint"), str, "")
    if student_checkpoint and not Path(student_checkpoint).is_file():
        raise recipe.error("student.checkpoint", f"no such file: {student_checkpoint}")
    teachers = {
        tname: _teacher(recipe, plugins, tname, _table(recipe, f"teachers.{tname}", table), allow_random_teachers,
                        data)
        for tname, table in _table(recipe, "teachers", t.get("teachers")).items()
    }
    heads = {
        hname: _head(recipe, plugins, hname, _table(recipe, f"heads.{hname}", table))
        for hname, table in _table(recipe, "heads", t.get("heads")).items()
    }
    losses = _losses(recipe, plugins, t.get("losses"), teachers)
    callbacks = {
        cname: _plugin_spec(recipe, plugins, "callback", _table(recipe, f"callbacks.{cname}", table),
                            f"callbacks.{cname}", sections.CALLBACK_KEYS, cname)
        for cname, table in _table(recipe, "callbacks", t.get("callbacks")).items()
    }
    cache = None if t.get("teacher_cache") is None else \
        _core(recipe, sections.CacheSettings, _table(recipe, "teacher_cache", t["teacher_cache"]), "teacher_cache")
    if cache is not None:
        _check_teacher_cache(recipe, cache, losses, augment)
    return Experiment(recipe, name, seed, data, dataset, student, teachers, heads, losses, train, augment,
                      evaluation, callbacks, cache, student_checkpoint)


def _check_teacher_cache(recipe, cache: sections.CacheSettings, losses: list[LossTerm],
                         augment: sections.AugmentConfig) -> None:
    """A cache of every logit serves any loss; mixed or top-k outputs only those that need no more than
    the teachers' probabilities at temperature 1."""
    why = "top_k keeps only the largest logits" if cache.top_k else \
        "mixup/cutmix with a cache mixes the teachers' probabilities at temperature 1" if augment.mixing else None
    if why is None:
        return
    for i, loss in enumerate(losses):
        if loss.teachers and not getattr(loss.fn, "probabilities_only", False):
            raise recipe.error(f"losses.{i}", f"{why}, which loss {loss.spec.plugin!r} as configured cannot use "
                               "(it needs the teachers' logits: another tau, a mean_logit ensemble, DKD or DIST); "
                               "train it with online teachers (no [teacher_cache])" +
                               ("" if augment.mixing else " or a cache of every class (top_k = 0)"))


def _check_train(recipe, data: sections.DataConfig, train: sections.TrainConfig,
                 augment: sections.AugmentConfig) -> None:
    """What the keys' ranges cannot say: how the values relate."""
    if len(augment.crop_scale) != 2 or augment.crop_scale[0] > augment.crop_scale[1]:
        raise recipe.error("augment.crop_scale", "must be two fractions, min then max (min <= max), "
                           f"got {augment.crop_scale}")
    if train.batch_size % train.accum_steps:
        raise recipe.error("train.accum_steps", f"must divide train.batch_size ({train.batch_size}) "
                           f"into equal micro-batches, got {train.accum_steps}")
    if augment.mixing and (train.batch_size // train.accum_steps) % 2:
        raise recipe.error("train.batch_size", "mixup/cutmix needs an even micro-batch "
                           "(batch_size / accum_steps)")
    if train.optimizer not in list_optimizers():
        raise recipe.error("train.optimizer", f"unknown optimizer {train.optimizer!r}"
                           f"{did_you_mean(train.optimizer, list_optimizers())} (any timm optimizer name)")


def _teacher(recipe, plugins, name, table, allow_random, data: sections.DataConfig) -> TeacherSpec:
    key = f"teachers.{name}"
    checkpoint = _typed(recipe, f"{key}.checkpoint", table.get("checkpoint"), str, "")
    pretrained = _typed(recipe, f"{key}.pretrained", table.get("pretrained"), bool, False)
    precision = _typed(recipe, f"{key}.precision", table.get("precision"), sections.Precision, "auto")
    compile_ = _typed(recipe, f"{key}.compile", table.get("compile"), bool, False)
    from kdkit.store.export import is_export  # a kdkit export rebuilds its own model

    if "recipe" in table:
        return _teacher_from_recipe(recipe, plugins, name, table, precision, compile_, data)
    if checkpoint and not Path(checkpoint).exists():
        raise recipe.error(f"{key}.checkpoint", f"no such file or directory: {checkpoint}")
    if checkpoint and is_export(checkpoint):
        if "plugin" in table:
            raise recipe.error(f"{key}.plugin", "the checkpoint is a kdkit run or student.safetensors, "
                               "which carries its own model: drop 'plugin' and the plugin's keys")
        extra = (table.keys() - sections.TEACHER_KEYS) | (sections.TEACHER_INPUT_KEYS & table.keys())
        if extra:
            raise recipe.error(f"{key}.{sorted(extra)[0]}", "unknown key for a teacher loaded from a kdkit export "
                               "(it carries its own model, class names and input normalization)")
        return TeacherSpec(name, None, checkpoint, False, precision, compile=compile_)
    spec = _plugin_spec(recipe, plugins, "teacher", table, key, sections.TEACHER_KEYS)
    if pretrained and not accepts(plugins.get("teacher", spec.plugin), "pretrained"):
        raise recipe.error(f"{key}.pretrained", f"teacher plugin {spec.plugin!r} has no pretrained weights")
    if not (checkpoint or pretrained or allow_random):
        raise recipe.error(key, "the teacher has no weights: set checkpoint or pretrained "
                           "(kdkit run --allow-random-teachers allows random teachers, for smoke tests)")
    classes = _class_names(recipe, f"{key}.classes", table.get("classes"))
    return TeacherSpec(name, spec, checkpoint, pretrained, precision, classes=classes, compile=compile_,
                       **_teacher_input(recipe, key, table))


def _teacher_input(recipe, key: str, table: dict) -> dict:
    """``mean`` and ``std`` (both or neither, one value per channel, std > 0) and ``input_size``."""
    stats = {name: _typed(recipe, f"{key}.{name}", table.get(name), list[float], None) for name in ("mean", "std")}
    mean, std = stats["mean"], stats["std"]
    if (mean is None) != (std is None):
        raise recipe.error(f"{key}.{'std' if std is None else 'mean'}", "give mean and std together: the "
                           "normalization the teacher's weights were trained with")
    if mean is not None and (len(mean) != len(std) or not mean or not all(s > 0 for s in std)):  # finite: typed
        raise recipe.error(f"{key}.std", f"expected one mean and one std > 0 per channel, got mean {mean} "
                           f"and std {std}")
    size = _typed(recipe, f"{key}.input_size", table.get("input_size"),
                  Annotated[int, Range(ge=1, le=sections.MAX_IMAGE_SIZE)], None)
    return dict(mean=mean, std=std, input_size=size)


def _class_names(recipe, key: str, value) -> list[str] | None:
    """A teacher's ``classes``: a list of names, or a text file of one name per line (``#`` comments)."""
    value = _typed(recipe, key, value, list[str] | str, None)
    if isinstance(value, str):
        try:
            lines = Path(value).read_text().splitlines()
        except OSError as exc:
            raise recipe.error(key, f"cannot read the class list: {exc}") from None
        value = [name for name in (line.split("#")[0].strip() for line in lines) if name]
    if value is not None and (not value or len(set(value)) != len(value)):
        raise recipe.error(key, "the class list must name each class once, at least one")
    return value


def _teacher_from_recipe(recipe, plugins, name, table, precision, compile_: bool,
                         data: sections.DataConfig) -> TeacherSpec:
    """A teacher trained by its own recipe (``kdkit run`` trains it first if it is not cached)."""
    from kdkit.recipe.toml import load_recipe

    key = f"teachers.{name}"
    path = _typed(recipe, f"{key}.recipe", table.get("recipe"), str, "")
    extra = table.keys() - {"recipe", "precision", "compile"}
    if extra:
        raise recipe.error(f"{key}.{sorted(extra)[0]}", "a teacher given by 'recipe' takes only 'precision' and "
                           "'compile' besides it: its model and weights come from the recipe's run")
    if not Path(path).is_file():
        raise recipe.error(f"{key}.recipe", f"no such recipe file: {path}")
    teacher_recipe = load_recipe(path)
    taught = resolve(teacher_recipe, plugins).data  # a broken teacher recipe is reported now, before anything trains
    def held_out(d: sections.DataConfig):
        return d.dataset, d.root or sections.default_data_root(), d.val_split

    if data.val_split > 0 and held_out(taught) != held_out(data):
        raise recipe.error(f"{key}.recipe", f"this run holds out data.val_split = {data.val_split} of the training "
                           f"images for validation, but the teacher's recipe ({path}) trains on other data or "
                           f"holds out another split (dataset {taught.dataset!r}, val_split {taught.val_split}): "
                           "the teacher would have seen the validation images. Give it the same data.dataset, "
                           "data.root and data.val_split")
    return TeacherSpec(name, None, "", False, precision, recipe=teacher_recipe, compile=compile_)


def _head(recipe, plugins, name, table) -> HeadSpec:
    key = f"heads.{name}"
    embedding = _typed(recipe, f"{key}.embedding", table.get("embedding"), str, name)
    return HeadSpec(name, _plugin_spec(recipe, plugins, "head", table, key, sections.HEAD_KEYS, "linear"), embedding)


def _losses(recipe, plugins, value, teachers: dict) -> list[LossTerm]:
    if value is None:
        raise recipe.error("losses", "missing: at least one [[losses]] entry (for example plugin = \"ce\", head = \"cls\")")
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise recipe.error("losses", "expected an array of tables ([[losses]] entries)")
    specs, terms = [], set()
    for i, table in enumerate(value):
        key = f"losses.{i}"
        spec = _plugin_spec(recipe, plugins, "loss", table, key, sections.LOSS_KEYS)
        head = _typed(recipe, f"{key}.head", table.get("head"), str, None)
        if head is None:
            raise recipe.error(f"{key}.head", "missing required key: the head whose logits this loss trains")
        names = _typed(recipe, f"{key}.teachers", table.get("teachers"), list[str], [])
        for j, tname in enumerate(names):
            if tname not in teachers:
                raise recipe.error(f"{key}.teachers.{j}", f"no teacher named {tname!r}"
                                   f"{did_you_mean(tname, teachers)}; declared: {', '.join(teachers) or '(none)'}")
        weight = _typed(recipe, f"{key}.weight", table.get("weight"), Annotated[float, Range(ge=0)], 1.0)
        fn = spec.build(plugins)
        needs = getattr(fn, "requires_teachers", None)
        if needs and not names:
            raise recipe.error(f"{key}.teachers", f"loss {spec.plugin!r} distils from teachers: name at least one")
        if needs is False and names:
            raise recipe.error(f"{key}.teachers", f"loss {spec.plugin!r} is a label loss and takes no teachers")
        term = f"{spec.plugin}/{head}"
        while term in terms:
            term += "'"
        terms.add(term)
        specs.append(LossTerm(term, spec, fn, head, names, weight))
    return specs


def check_heads(exp: Experiment, embedding_dims: dict[str, int]) -> dict[str, HeadSpec]:
    """Every head: the declared ones, plus a linear one for each student embedding no declared head reads;
    check every reference to them."""
    heads = dict(exp.heads)
    read = {head.embedding for head in heads.values()}
    for emb in embedding_dims:
        if emb not in read:
            heads.setdefault(emb, HeadSpec(emb, PluginSpec("head", "linear", {}, f"heads.{emb}"), emb))
    for name, head in heads.items():
        if name in sections.PREDICTIONS:
            raise exp.recipe.error(f"heads.{name}", f"{name!r} names a prediction kdkit reports; choose another name")
        if head.embedding not in embedding_dims:
            raise exp.recipe.error(f"heads.{name}.embedding", f"the student has no embedding {head.embedding!r}"
                                   f"{did_you_mean(head.embedding, embedding_dims)}; it returns: "
                                   f"{', '.join(embedding_dims)}")
    for i, loss in enumerate(exp.losses):
        if loss.head not in heads:
            raise exp.recipe.error(f"losses.{i}.head", f"no head named {loss.head!r}{did_you_mean(loss.head, heads)}; "
                                   f"heads: {', '.join(heads)}")
    for i, name in enumerate(exp.eval.heads):
        if name not in heads:
            raise exp.recipe.error(f"eval.heads.{i}", f"no head named {name!r}{did_you_mean(name, heads)}; "
                                   f"heads: {', '.join(heads)}")
    if not exp.eval.heads:
        raise exp.recipe.error("eval.heads", "must name at least one head")
    return heads
