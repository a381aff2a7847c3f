"""Zoos on disk: a folder of safetensors checkpoints plus a ``zoo.json`` index.

Each checkpoint carries its architecture record, seed, dataset and final
train/test loss and accuracy in its metadata; ``zoo.json`` lists them all with
the settings that made them, so a rerun with the same settings resumes and a
rerun with other settings is refused instead of mixing two zoos.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

from modelmerge.archs import record_to_json, validate_record
from modelmerge.checkpoint import META_PREFIX, load_checkpoint, save_checkpoint, write_json_atomic
from modelmerge.data import load_dataset
from modelmerge.errors import CheckpointError, ModelMergeError, OutputError
from modelmerge.zoo.train import TrainConfig, train_models

ZOO_FORMAT = "modelmerge.zoo/1"
INDEX = "zoo.json"


def model_file(i: int) -> str:
    return f"model_{i:05d}.safetensors"


def _write_index(folder: Path, index: Mapping) -> None:
    write_json_atomic(folder / INDEX, index)


def read_index(folder: str | Path) -> dict:
    """Read a zoo's ``zoo.json``.

    Raises:
        ModelMergeError: no index, or an unreadable one.
    """
    path = Path(folder) / INDEX
    if not path.is_file():
        raise ModelMergeError(f"{folder} is not a zoo (no {INDEX}); make one with `modelmerge zoo`")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelMergeError(f"{path} is corrupt (not JSON); remove it and rerun `modelmerge zoo`") from None
    if not isinstance(index, dict) or index.get("format") != ZOO_FORMAT:
        raise ModelMergeError(f"{path} is not a {ZOO_FORMAT} index")
    models = index.get("models")
    if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("file"), str)
                                               and isinstance(m.get("seed"), int) for m in models):
        raise ModelMergeError(f"{path} has no valid 'models' list; remove it and rerun `modelmerge zoo`")
    try:
        index["arch"] = validate_record(index.get("arch"))
    except ModelMergeError as e:
        raise ModelMergeError(f"{path}: {e}") from None
    return index


def make_zoo(
    record: Mapping,
    dataset: str,
    n: int,
    folder: str | Path,
    *,
    seed: int = 0,
    config: TrainConfig = TrainConfig(),
    chunk: int = 50,
    on_step: Callable[[int, int, float], None] | None = None,
    notes: list[str] | None = None,
) -> dict:
    """Train ``n`` models (seeds ``seed .. seed+n-1``) and write them to ``folder``.

    Models are trained ``chunk`` at a time, vectorised; each chunk is written
    as soon as it is done, so an interrupted run resumes where it stopped.

    Args:
        record: architecture record of every model.
        dataset: ``digits``, ``mnist1d`` or a data file.
        n: number of models.
        folder: output folder (created if missing).
        seed: first seed.
        config: training settings.
        chunk: models trained together (memory grows with it).
        on_step: progress callback (steps done, total steps, mean loss).
        notes: if given, gets a line for each listed model that was unreadable and is trained again.

    Returns:
        The written index.

    Raises:
        OutputError: the folder holds a zoo made with other settings.
    """
    record = validate_record(record)
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise OutputError(f"cannot create zoo folder {out}: it is a file; pass the path of a (new) folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create zoo folder {out}: {e.strerror}") from None
    try:
        return _fill_zoo(record, dataset, n, out, seed, config, chunk, on_step, notes)
    except BaseException:
        if created and not any(out.iterdir()):  # failed before writing anything: leave no empty folder
            out.rmdir()
        raise


def _fill_zoo(record, dataset, n, out: Path, seed, config, chunk, on_step, notes) -> dict:
    settings = {
        "format": ZOO_FORMAT, "arch": record, "dataset": dataset, "seed": seed,
        "train": asdict(config),
    }
    index = {**settings, "models": []}
    broken: set[str] = set()  # listed files that no longer read: trained again
    if (out / INDEX).exists():
        old = read_index(out)
        if {k: old.get(k) for k in settings} != settings:
            raise OutputError(
                f"{out} holds a zoo made with other settings (architecture, dataset, seed or training); "
                "use another folder"
            )
        for m in old["models"]:
            if not (out / m["file"]).is_file():
                continue
            if not seed <= m["seed"] < seed + n:  # not this run's: listed as it is
                index["models"].append(m)
                continue
            try:  # a listed file cut short or overwritten since is trained again, not trusted
                load_checkpoint(out / m["file"])
            except CheckpointError as e:
                broken.add(m["file"])
                if notes is not None:
                    notes.append(f"{str(e).split(';')[0]}; training it again (seed {m['seed']})")
                continue
            index["models"].append(m)
    done = {m["seed"] for m in index["models"]}
    todo = [s for s in range(seed, seed + n) if s not in done]
    strangers = [model_file(s - seed) for s in todo
                 if (out / model_file(s - seed)).exists() and model_file(s - seed) not in broken]
    if strangers:  # a rerun resumes what zoo.json lists; anything else is somebody's file
        raise OutputError(f"{out} already holds {strangers[0]}, which its zoo.json does not list; move it away or "
                          "use another folder (zoo never overwrites files it did not write)")
    data = load_dataset(dataset)
    steps_per_model = (len(data.x_train) // min(config.batch_size, len(data.x_train))) * config.epochs
    total = steps_per_model * len(todo)
    finished_steps = 0
    for start in range(0, len(todo), chunk):
        seeds = todo[start:start + chunk]

        def progress(step, _total, loss, base=finished_steps, width=len(seeds)):
            if on_step is not None:  # count model-steps: one step trains the whole chunk
                on_step(base + step * width, total, loss)

        for m in train_models(record, data, seeds, config, on_step=progress):
            i = m.seed - seed
            numbers = {"train_loss": m.train_loss, "train_acc": m.train_acc,
                       "test_loss": m.test_loss, "test_acc": m.test_acc}
            meta = {META_PREFIX + "arch": record_to_json(record), META_PREFIX + "seed": str(m.seed),
                    META_PREFIX + "dataset": dataset, **{META_PREFIX + k: repr(v) for k, v in numbers.items()}}
            save_checkpoint(m.state, out / model_file(i), meta, force=True, check_values=False)  # rerun retrains NaN ones
            index["models"].append({"file": model_file(i), "seed": m.seed, **numbers})
        index["models"].sort(key=lambda m: m["seed"])
        _write_index(out, index)
        finished_steps += steps_per_model * len(seeds)
    if not todo:
        _write_index(out, index)
    return index


def load_zoo(folder: str | Path) -> tuple[dict, list]:
    """The index and the checkpoints of a zoo.

    Raises:
        ModelMergeError: not a zoo, or a listed file is missing or unreadable.
    """
    index = read_index(folder)
    checkpoints = []
    for m in index["models"]:
        try:
            checkpoints.append(load_checkpoint(Path(folder) / m["file"]))
        except CheckpointError as e:
            # the zoo command wrote it, so the fix is to run that again (it retrains unreadable models)
            raise ModelMergeError(f"zoo {folder}: {str(e).split(';')[0]}; rerun the `modelmerge zoo` command that "
                                  "made the zoo (it trains unreadable models again)") from None
    return index, checkpoints
