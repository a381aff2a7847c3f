"""``modelmerge zoo``: train many small models at once and write them as a zoo folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelmerge.cli._common import (
    Threads,
    ZooSeed,
    console,
    fail,
    handle_errors,
    progress_bar,
    set_threads,
    warn,
)

EXAMPLES = """
Examples:

  modelmerge zoo --arch mlp --widths 64,128,128,128,10 --dataset digits -n 200 -o ./zoo

  modelmerge zoo --arch cnn --channels 16,32 --hidden 64 --batchnorm --dataset digits -n 50 -o ./cnn-zoo
"""


def _int_list(text: str | None, name: str) -> list[int]:
    from modelmerge.errors import ModelMergeError

    if not text:
        return []
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ModelMergeError(f"--{name} must be comma-separated integers like 64,128,10; got {text!r}") from None
    if any(v < 1 for v in values):
        raise ModelMergeError(f"--{name} values must be positive; got {text!r}")
    return values


@handle_errors
def zoo_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Zoo folder (created; reruns resume).")],
    arch: Annotated[str, typer.Option("--arch", help="mlp | cnn")] = "mlp",
    widths: Annotated[
        str | None, typer.Option("--widths", help="MLP widths including input and output, e.g. 64,128,128,128,10.")
    ] = None,
    channels: Annotated[
        str | None, typer.Option("--channels", help="CNN conv channels, e.g. 16,32 (default 16,32).")
    ] = None,
    hidden: Annotated[
        str | None, typer.Option("--hidden", help="CNN hidden linear widths before the head (default none).")
    ] = None,
    batchnorm: Annotated[bool, typer.Option("--batchnorm", help="CNN: BatchNorm after each conv.")] = False,
    pool: Annotated[bool, typer.Option("--pool/--no-pool", help="CNN: 2x max pooling after each conv.")] = True,
    activation: Annotated[str, typer.Option("--activation", help="relu | gelu | tanh | silu | leaky_relu")] = "relu",
    dataset: Annotated[str, typer.Option("--dataset", help="digits | mnist1d | teacher | FILE.npz/.safetensors")] = "digits",
    n: Annotated[int, typer.Option("-n", "--num-models", min=1, help="How many models.")] = 10,
    seed: ZooSeed = 0,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 30,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 1e-3,
    chunk: Annotated[int, typer.Option("--chunk", min=1, help="Models trained together (memory grows with it).")] = 50,
    threads: Threads = None,
) -> None:
    """Train N independent models (seeds SEED..SEED+N-1), vectorised, into a zoo folder."""
    from modelmerge.data import load_dataset
    from modelmerge.errors import ModelMergeError, check_seed
    from modelmerge.zoo.store import make_zoo
    from modelmerge.zoo.train import TrainConfig

    check_seed(seed)
    if seed + n - 1 >= 2**32:  # every model's seed must be valid
        raise ModelMergeError(f"--seed {seed} with -n {n} needs seeds up to {seed + n - 1}, past {2**32 - 1}; "
                              f"use a --seed of at most {2**32 - n}")
    if arch == "mlp":
        cnn_only = [o for o, given in (("--channels", channels is not None), ("--hidden", hidden is not None),
                                       ("--batchnorm", batchnorm), ("--no-pool", not pool)) if given]
        if cnn_only:
            raise ModelMergeError(f"{', '.join(cnn_only)} describe CNNs; add --arch cnn, or drop them for an MLP")
    elif arch == "cnn" and widths is not None:
        raise ModelMergeError("--widths describes MLPs; a CNN takes --channels and --hidden (or use --arch mlp)")
    set_threads(threads, default=None)
    data = load_dataset(dataset)
    if arch == "mlp":
        w = _int_list(widths, "widths")
        if not w:
            flat = int(data.flat().input_shape[0])
            w = [flat, 128, 128, 128, data.num_classes]
        record = {"family": "mlp", "widths": w, "activation": activation}
    elif arch == "cnn":
        record = {"family": "cnn", "input_shape": list(data.input_shape),
                  "channels": _int_list(channels or "16,32", "channels"),
                  "hidden": _int_list(hidden or "", "hidden"), "batchnorm": batchnorm, "pool": pool, "kernel": 3,
                  "num_classes": data.num_classes, "activation": activation}
    else:
        raise ModelMergeError(f"unknown --arch {arch!r}; choose mlp or cnn")
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr)
    notes: list[str] = []
    try:
        with progress_bar(f"training {n} models") as bar:
            index = make_zoo(record, dataset, n, output, seed=seed, config=config, chunk=chunk, notes=notes,
                             on_step=lambda step, total, loss: bar(step, total, f"loss {loss:.3f}"))
    except KeyboardInterrupt:
        # every finished chunk is on disk and listed in zoo.json: say how far it got
        from modelmerge.zoo.store import INDEX, read_index

        have = len(read_index(output)["models"]) if (output / INDEX).is_file() else 0
        fail(f"interrupted; {have} of {n} models are in {output}"
             + (" (rerun the same command to train the rest)" if have else ", nothing was written"), code=130)
    for note in notes:
        warn(note)
    models = index["models"]
    if len(models) > n:
        warn(f"{output} holds {len(models)} models, more than -n {n}: it had them before (a rerun adds "
             "models, never removes them)")
    acc = [m["test_acc"] for m in models]
    console().print(f"zoo {output}: {len(models)} models, test accuracy {min(acc):.3f}..{max(acc):.3f} "
                    f"(mean {sum(acc) / len(acc):.3f}); index {output}/zoo.json")
