"""Option types and helpers shared by the commands.

Modules here import typer and rich only at the top; torch and the library are
imported inside command bodies so that ``modelmerge --help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from modelmerge.errors import ModelMergeError

F = TypeVar("F", bound=Callable[..., Any])

Force = Annotated[bool, typer.Option("--force", help="Overwrite existing output files (never inputs).")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed, 0..2^32-1 (weight matching's group visiting order, "
                                   "the refinement's batches, verification inputs).")]
ZooSeed = Annotated[int, typer.Option("--seed", help="First model's seed, 0..2^32-1: model i gets SEED+i (its "
                                      "initialisation and data order).")]
MergeSeed = Annotated[int, typer.Option("--seed", help="Random seed, 0..2^32-1 (the order in which MergeMany visits "
                                        "the models and each model's groups, REPAIR's input sample, verification "
                                        "inputs).")]
TrainSeed = Annotated[int, typer.Option("--seed", help="Random seed, 0..2^32-1 (the aligner's initialisation, the "
                                        "training pairs, validation pairs and split).")]
SpecFile = Annotated[
    Path | None,
    typer.Option("--spec", help="Permutation spec JSON (see docs/spec-format.md); inferred when omitted.",
                 dir_okay=False),
]
Revision = Annotated[
    str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit) for hub ids.")
]
Threads = Annotated[
    int | None,
    typer.Option("--threads", min=1,
                 help="CPU threads for torch and for NumPy/SciPy's BLAS (default: env MODELMERGE_THREADS, "
                      "else the command's measured best; see docs/benchmarks.md)."),
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Model class pkg.module:Class (current folder importable): traced spec and "
                 "real forward."),
]
ModelKwargs = Annotated[str | None, typer.Option("--model-kwargs", help="JSON keyword arguments for --model.")]
InputShape = Annotated[
    str | None, typer.Option("--input-shape", help="One input's shape for --model, e.g. 1,28,28 (else guessed).")
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout instead of a table.")]


def fail(message: str, code: int = 1) -> None:
    """Print one line to stderr and exit."""
    sys.stderr.write("modelmerge: error: " + " ".join(str(message).split()) + "\n")
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn ModelMergeError into one stderr line and exit code 1 (traceback with MODELMERGE_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        WRITTEN.clear()
        try:
            return fn(*args, **kwargs)
        except ModelMergeError as e:
            if os.environ.get("MODELMERGE_DEBUG") == "1":
                raise
            fail(str(e) + (f" (already written: {', '.join(WRITTEN)})" if WRITTEN else ""))
        except KeyboardInterrupt:
            done = f"only {', '.join(WRITTEN)} was written (complete)" if WRITTEN else "no output was written"
            fail(f"interrupted; {done}", code=130)

    return wrapper  # type: ignore[return-value]


def set_threads(threads: int | None, default: int | None = 1) -> int:
    """Set torch's and the BLAS/OpenMP pools' thread count: the option, else MODELMERGE_THREADS, else ``default``.

    Delegates to :func:`modelmerge.threads.set_threads`. Alignment works on
    small matrices, where one thread is as fast as two and cannot be slowed by
    a busy neighbour, so its default is 1; batched training (``default=None``:
    all cores) gains from more (docs/benchmarks.md).

    Returns:
        The number of threads set.
    """
    from modelmerge.threads import set_threads as _set_threads

    return _set_threads(threads, default)


def console():
    """A rich console on stdout, for results: tables, what was written (``modelmerge inspect A > f``
    keeps them). Progress bars, warnings and errors go to stderr; ``--json`` prints JSON instead."""
    from rich.console import Console

    # redirected (a file, a pipe), lines are kept whole: wrapped at rich's default 80 columns they broke
    # greps (a parameter list continued at column 0); no highlighting of numbers inside names either
    return Console(highlight=False, width=None if sys.stdout.isatty() else 10_000)


def print_json(data: Any) -> None:
    """``data`` as indented, strict JSON on stdout (non-finite numbers as null, as in written reports)."""
    from modelmerge.checkpoint import clean_json

    sys.stdout.write(json.dumps(clean_json(data), indent=2, allow_nan=False) + "\n")


def write_json(path: Path, data: Any, inputs: list[str], force: bool) -> None:
    """Write JSON atomically with the same safety rules as checkpoints."""
    from modelmerge.checkpoint import check_output_path, write_json_atomic

    write_json_atomic(check_output_path(path, inputs, force, suffix=".json"), data, replace=force)
    WRITTEN.append(str(path))


#: outputs this command has written completely, so an interrupt can say exactly what exists
WRITTEN: list[str] = []


def save(state, path: Path, metadata: dict, inputs: list[str], force: bool) -> str:
    """``save_checkpoint`` for commands: atomic, never over an input, and remembered in :data:`WRITTEN`."""
    from modelmerge.checkpoint import save_checkpoint

    out = str(save_checkpoint(state, path, metadata, inputs, force))
    WRITTEN.append(out)
    return out


class progress_bar:
    """A rich progress bar on stderr: ``with progress_bar("x") as update: update(done, total, info)``."""

    def __init__(self, description: str) -> None:
        self.description = description

    def __enter__(self):
        import time

        self._progress = None  # shown from the first update, so early errors print no empty bar
        from rich.console import Console

        self._console = Console(stderr=True)  # progress is not a result: stdout stays clean
        self._last_line = time.monotonic()
        return self.update

    def update(self, done: int, total: int, info: str = "") -> None:
        if not self._console.is_terminal:
            # logs (a background job's stderr): a plain line every 15 s and at the end
            import time

            now = time.monotonic()
            if now - self._last_line >= 15 or done >= total:
                self._last_line = now
                self._console.print(f"{self.description}: {done}/{total} {info}", soft_wrap=True)
            return
        if self._progress is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"), console=self._console,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=total, info="")
        self._progress.update(self._task, completed=done, total=total, info=info)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


AssumeChain = Annotated[
    bool, typer.Option("--assume-chain", help="State that a bare checkpoint (no record, no --model) is a plain "
                       "chain: its layers run in the file's order, no skip connections, conv maps flattened channel by channel. Otherwise one that reads "
                       "like residual blocks is refused, and the guesses are warned of.")
]


def load(source, revision: str | None = None):
    """:func:`~modelmerge.checkpoint.load_checkpoint` for commands: the choices it made in reading
    the file (which of several state dicts, entries that are not tensors) printed as warnings."""
    from modelmerge.checkpoint import load_checkpoint

    ck = load_checkpoint(source, revision)
    for note in ck.notes:
        warn(note)
    return ck


def check_records(cks) -> None:
    """Refuse checkpoints whose architecture records disagree: a command runs all of them with the
    first one's forward and writes one record into its output, so the other would be measured (and
    labelled) as a model it is not. A checkpoint without a record does not count.

    Raises:
        MismatchError: naming the two files and the first field that differs.
    """
    from modelmerge.errors import MismatchError

    first = next((ck for ck in cks if ck.arch is not None), None)
    for ck in cks:
        if first is None or ck.arch is None or ck.arch == first.arch:
            continue
        keys = sorted(set(first.arch) | set(ck.arch))
        k = next(k for k in keys if first.arch.get(k) != ck.arch.get(k))
        raise MismatchError(
            f"{first.source} and {ck.source} carry different architecture records ({k}: "
            f"{first.arch.get(k)!r} vs {ck.arch.get(k)!r}); they would all be run as the first one's model. "
            "Pass checkpoints of one model, or re-save one without its 'modelmerge.arch' metadata if the "
            "record is wrong")


def check_record_fits(ck) -> None:
    """Refuse a checkpoint whose architecture record does not describe its tensors (a command that
    copies the record into its output would otherwise write a file modelmerge then refuses).

    Raises:
        ArchError: naming the file, the keys that do not fit and the fix.
    """
    from modelmerge.archs import ArchError, check_fits

    if ck.arch is None:
        return
    try:
        check_fits(ck.arch, ck.state)
    except ArchError as e:
        raise _record_error(ck, e) from None


def _record_error(ck, e: Exception) -> Exception:
    from modelmerge.archs import ArchError

    return ArchError(f"{ck.source}: {e}; re-save it without its 'modelmerge.arch' metadata, or with a record "
                     "that describes it")


def warn(message: str) -> None:
    """One warning line on stderr (after the work: an error stays the only line when there is one)."""
    sys.stderr.write("modelmerge: warning: " + " ".join(str(message).split()) + "\n")


def resolve(ck, spec_file: Path | None = None, model: str | None = None,
            model_kwargs: str | None = None, input_shape: str | None = None, assume_chain: bool = False,
            spec_needed: bool = True):
    """The :class:`~modelmerge.network.Network` for a checkpoint (a loaded
    :class:`~modelmerge.checkpoint.Checkpoint`, A's) and the options every command shares.

    ``--spec`` is read, ``--model`` imported and built with A's weights, then
    :func:`~modelmerge.network.resolve_network` decides the rest. ``spec_needed=False``
    (commands that only run the model) skips tracing ``--model``.

    Raises:
        ModelMergeError: bad options, user code that fails, or a spec/record that does not fit.
    """
    from modelmerge.errors import ModelMergeError
    from modelmerge.network import resolve_network
    from modelmerge.spec import PermutationSpec

    state, record = ck.state, ck.arch
    given = PermutationSpec.load(spec_file) if spec_file is not None else None
    if model is None:
        if model_kwargs is not None or input_shape is not None:
            raise ModelMergeError("--model-kwargs and --input-shape need --model")
        from modelmerge.archs import ArchError

        try:
            return resolve_network(state, spec=given, record=record, assume_chain=assume_chain, ordered=ck.ordered)
        except ArchError as e:
            raise _record_error(ck, e) from None
    from modelmerge.cli._model import build_model, parse_shape

    shape = parse_shape(input_shape)
    module = build_model(model, model_kwargs, state)
    return resolve_network(state, spec=given, record=record, module=module, input_shape=shape, trace=spec_needed,
                           ordered=ck.ordered)
