"""Errors kdkit reports to the user without a traceback."""
from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable


class KdkitError(Exception):
    """A problem with the user's input (recipe, paths, plugins): the CLI prints it and exits with 2."""


class RecipeError(KdkitError):
    """A recipe key is wrong; the message names the file and the key path."""

    def __init__(self, message: str, *, file: object = None, key: str | None = None):
        self.file, self.key, self.message = file, key, message
        where = ": ".join(str(part) for part in (file, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class PluginError(KdkitError):
    """Two distributions register the same plugin name, or a plugin breaks its contract."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean: a, b?)' for the closest valid names, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


class RunFailed(Exception):
    """The run cannot go on (a non-finite loss, a file that cannot be written): the CLI prints
    the message and exits with 1; the run directory keeps its last good checkpoint."""


@contextlib.contextmanager
def keep_first_error(first: BaseException | None):
    """Clean-up while ``first`` propagates (None: nothing does): an error of the block is added to ``first`` as a
    note (PEP 678; the CLI prints it after the message) instead of replacing it: the first error is the one to see."""
    try:
        yield
    except Exception as second:
        if first is None:
            raise
        first.__notes__ = [*getattr(first, "__notes__", []), f"then {second}"]  # ``add_note`` before Python 3.11


class RunInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a step, with a checkpoint to resume from."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class UnreadableImage(KdkitError):
    """An image file that cannot be decoded (empty, truncated, not an image, over the pixel limit); the
    message names it. Before a run starts it is bad input (exit 2); met while training, the engine turns
    it into ``RunFailed``.

    A DataLoader worker's exception reaches the main process rebuilt from its traceback's text, whose
    last line is ``kdkit.errors.UnreadableImage: <message>``: the message is taken back from there.
    """

    def __init__(self, message: str):
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].partition("UnreadableImage: ")[2]
        super().__init__(message)


def reason(exc: BaseException) -> str:
    """Why a read or write failed, on one line: the OS error behind ``exc`` (torch reports a full disk as a
    ``RuntimeError`` raised while handling it), else the gist of ``exc``'s message (torch's weights-only
    refusal: its cause, not its advice)."""
    cause = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and cause.strerror:
        return cause.strerror
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        lines = [line for line in lines[1:] if not line.startswith(("Please file an issue", "Check the documentation"))]
    return lines[0][:300] if lines else type(exc).__name__

