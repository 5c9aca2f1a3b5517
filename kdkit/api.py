"""The published plugin API: everything a kdkit plugin may use, built-in or third-party.

Plugins import this module and nothing else of kdkit (the built-in ones are held to it by a test);
every other core module (under ``kdkit/recipe``, ``plugin``, ``builder``, ``train``, ``store``, ``tools``)
is internal and may change.

- hooks: ``hookimpl`` marks the functions (or a callback object's methods) that implement the
  hooks of ``kdkit.plugin.hookspecs``: one registration hook per kind, and the run's lifecycle hooks.
  ``register(kind, name)`` is the short form of a registration hook: a decorator on the factory.
- recipe keys: ``Range`` bounds a factory's number, ``Annotated[float, Range(gt=0)]``, checked with the
  recipe (every float must also be finite); ``MAX_IMAGE_SIZE`` and ``MAX_CLASSES`` are the documented
  largest image side and class count.
- errors: raise ``KdkitError`` for bad input (exit 2) and ``RunFailed`` when a run cannot go on (exit 1);
  ``keep_first_error`` for clean-up while an error propagates.
- data: ``DatasetSplits`` (what a dataset plugin returns), ``build_transforms`` and
  ``AugmentConfig`` (so ``[augment]`` applies), ``fingerprint`` (a content hash for
  ``DatasetSplits.fingerprint``), ``cache_root`` and ``default_data_root``, ``read_image`` (one image
  file decoded, or ``UnreadableImage`` naming it).
- models and losses: ``PooledStudent`` (a CNN's pooled features as the student embedding
  ``pool``), ``teacher_log_probs`` (several teachers combined, as ``kl`` does it), ``traced_shape``
  (for ``kdkit_flop_rules``: the shape of an operator's traced input or output).
- runs, for callbacks: ``Run`` (what lifecycle hooks receive: the run, read-only), ``Summary`` (its
  ``summary.json``), ``RunDir`` (the run directory's paths and atomic writers), ``save_checkpoint`` and ``save_export``. ``Trainer``, what
  0.1's hooks were annotated with, is a deprecated alias of ``Run``.
"""
import warnings

from kdkit.builder.data import DatasetSplits, build_transforms, fingerprint
from kdkit.builder.flops import traced_shape
from kdkit.builder.images import read_image
from kdkit.builder.model import PooledStudent
from kdkit.builder.teacher import teacher_log_probs
from kdkit.errors import KdkitError, RunFailed, UnreadableImage, did_you_mean, keep_first_error
from kdkit.plugin.discovery import register
from kdkit.plugin.hookspecs import hookimpl
from kdkit.recipe.schema import Range
from kdkit.recipe.sections import MAX_CLASSES, MAX_IMAGE_SIZE, AugmentConfig, cache_root, default_data_root
from kdkit.store.checkpoint import save_checkpoint
from kdkit.store.export import save as save_export
from kdkit.store.rundir import RunDir
from kdkit.store.summary import Summary
from kdkit.train.run_view import Run

__all__ = [
    "MAX_CLASSES", "MAX_IMAGE_SIZE", "AugmentConfig", "DatasetSplits", "KdkitError", "PooledStudent", "Range",
    "Run", "RunDir", "RunFailed", "UnreadableImage", "build_transforms", "cache_root", "default_data_root",
    "did_you_mean", "fingerprint", "hookimpl", "keep_first_error", "read_image", "register", "save_checkpoint",
    "save_export", "Summary", "teacher_log_probs", "traced_shape",
]


def __getattr__(name: str):
    if name == "Trainer":
        warnings.warn("kdkit.api.Trainer is deprecated: hooks receive a kdkit.api.Run", DeprecationWarning,
                      stacklevel=2)
        return Run
    raise AttributeError(f"module 'kdkit.api' has no attribute {name!r}")
