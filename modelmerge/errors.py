"""The one user-facing error type of modelmerge.

Every problem a user can fix (a missing file, a corrupt checkpoint, mismatched
architectures, an output that would overwrite an input, ...) is raised as a
:class:`ModelMergeError` whose message is a single line naming the problem and
the fix. The command line turns it into that line on stderr and exit code 1;
anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class ModelMergeError(Exception):
    """A problem with the user's input or environment, with a one-line message."""


class CheckpointError(ModelMergeError):
    """A checkpoint cannot be found, read, or holds unusable values."""


class SpecError(ModelMergeError):
    """A permutation spec cannot be inferred, read, or does not fit a state dict."""


class MismatchError(ModelMergeError):
    """Two checkpoints do not share an architecture (keys or shapes differ)."""


class OutputError(ModelMergeError):
    """An output path is unsafe or cannot be written."""


class VerificationError(ModelMergeError):
    """A permuted model does not compute the same function as the original."""


class DataError(ModelMergeError):
    """A dataset name or data file is unknown or malformed."""


def check_seed(seed: int) -> None:
    """Raise ModelMergeError unless ``0 <= seed < 2**32`` (what NumPy's and torch's generators take)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ModelMergeError(f"--seed must be a whole number from 0 to {2**32 - 1}, got {seed!r}")


def check_count(value: int, name: str) -> None:
    """Raise ModelMergeError unless ``value`` is a whole number of 1 or more (``max_iter`` and the like)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelMergeError(f"{name} must be a whole number of 1 or more, got {value!r}")


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message folded to one line and cut at ``limit`` (its type name if empty)."""
    return " ".join(str(e).split())[:limit] or type(e).__name__


def preview(items: list[str], n: int = 5) -> str:
    """``a, b, c (+N more)``: the first ``n`` names of a list, for one-line messages."""
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


#: the largest JSON side file (spec, aligner card, config) read: far above any real one, far below memory
TEXT_LIMIT = 64 * 2**20


def read_text(path, what: str, error: type[ModelMergeError] = ModelMergeError, limit: int = TEXT_LIMIT) -> str:
    """A small UTF-8 JSON side file's text (a spec, an aligner card, a config), refusing what is not one.

    Folders, files over ``limit`` bytes (at most ``limit + 1`` bytes are ever read, so a device
    that never ends is refused too) and bytes that are not UTF-8 are refused; pipes (``--spec
    <(...)``) are read like files.

    Raises:
        error: naming ``what``, the path and the problem (a missing file included).
    """
    import os
    import stat

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} not found; check the path") from None
    except OSError as e:
        raise error(f"cannot read {what} {path} ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {path} is a folder; pass the file") from None
    too_large = f"{what} {path} is over {limit / 2**20:.0f} MiB, too large to be one; check the path"
    if st.st_size > limit:
        raise error(too_large) from None
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {what} {path} ({e.strerror})") from None
    if len(raw) > limit:  # a pipe or device that kept giving
        raise error(too_large) from None
    try:
        return raw.decode("utf-8-sig")  # (a byte-order mark, as Windows editors write, is dropped)
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not valid JSON (not UTF-8 text: a binary file?); check the path") from None


def parse_json(text: str, what: str, error: type[ModelMergeError] = ModelMergeError, fix: str = "") -> object:
    """``json.loads(text)``, with every way it fails as one ``error`` naming ``what`` (and ``fix``, if given).

    Besides syntax errors: nesting too deep for the parser (RecursionError) and integers longer than
    Python converts (ValueError), which escaped as tracebacks.
    """
    import json

    tail = f"; {fix}" if fix else ""

    def no_duplicates(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:  # json keeps the last one silently: a hand-edited file's slip
                raise error(f"{what} names {k!r} twice in one object; keep one{tail}")
            seen[k] = v
        return seen

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON (line {e.lineno}: {e.msg}){tail}") from None
    except RecursionError:
        raise error(f"{what} is not valid JSON for modelmerge (nested too deeply){tail}") from None
    except ValueError as e:
        raise error(f"{what} is not valid JSON for modelmerge ({one_line(e, 120)}){tail}") from None
