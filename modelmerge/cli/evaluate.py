"""``modelmerge evaluate A B --dataset …``: loss and accuracy along the interpolation A -> B."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelmerge.cli._common import (
    AssumeChain,
    Force,
    InputShape,
    JsonOut,
    ModelKwargs,
    ModelOpt,
    Revision,
    Threads,
    check_records,
    console,
    handle_errors,
    load,
    print_json,
    progress_bar,
    resolve,
    set_threads,
    warn,
)

EXAMPLES = """
Examples:

  modelmerge evaluate a.safetensors b.safetensors --dataset digits

  modelmerge evaluate a.safetensors b_aligned.safetensors --dataset digits --alphas 21 --plot curve.png
"""


@handle_errors
def evaluate_command(
    a: Annotated[str, typer.Argument(help="Checkpoint A (alpha = 0).")],
    b: Annotated[str, typer.Argument(help="Checkpoint B (alpha = 1), aligned to A or not.")],
    dataset: Annotated[str, typer.Option("--dataset", help="digits | mnist1d | teacher | FILE.npz/.safetensors with x, y")],
    alphas: Annotated[int, typer.Option("--alphas", min=2, help="Evenly spaced alphas in [0, 1].")] = 11,
    split: Annotated[str, typer.Option("--split", help="test | train")] = "test",
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of loss and accuracy curves.")] = None,
    reset_bn: Annotated[
        bool, typer.Option("--reset-bn", help="Recompute BatchNorm statistics of every interpolated model on the "
                           "train split before measuring it.")
    ] = False,
    repair: Annotated[
        bool, typer.Option("--repair", help="REPAIR every interpolated model: rescale its hidden units to the "
                           "interpolated statistics of A's and B's on the train split (after --reset-bn).")
    ] = False,
    model: ModelOpt = None,
    model_kwargs: ModelKwargs = None,
    input_shape: InputShape = None,
    assume_chain: AssumeChain = False,
    json_out: JsonOut = False,
    revision: Revision = None,
    threads: Threads = None,
    force: Force = False,
) -> None:
    """Loss/accuracy of (1-alpha)*A + alpha*B over alpha, with the loss barrier and its AUC."""
    from modelmerge.checkpoint import check_output_path
    from modelmerge.data import load_dataset
    from modelmerge.errors import ModelMergeError
    from modelmerge.evaluate import interpolation_curve
    from modelmerge.merge import check_mergeable, check_same_architecture, interpolate

    if split not in ("test", "train"):
        raise ModelMergeError(f"--split must be test or train, got {split!r}")
    if force and plot is None:  # evaluate writes nothing else
        raise ModelMergeError("--force lets --plot replace an existing file; add --plot FILE.png or drop --force")
    if plot is not None:
        check_output_path(plot, [a, b, dataset], force, suffix=".png")
        _require_matplotlib()
    set_threads(threads)
    ck_a, ck_b = load(a, revision), load(b, revision)
    check_records([ck_a, ck_b])
    check_same_architecture(ck_a.state, ck_b.state)
    check_mergeable(ck_a.state, ck_b.state)
    network = resolve(ck_a, None, model, model_kwargs, input_shape, assume_chain,
                      spec_needed=repair)  # only REPAIR reads the groups
    task = load_dataset(dataset)
    if repair:
        from modelmerge.repair import Repair, merge_pair, repair_inputs

        # reset (if asked) then REPAIR inside the merge; the metric must not reset again afterwards
        metric = network.metric(task, split)
        reset_x = network.bn_inputs(task) if reset_bn else None
        fixer = Repair(network, [ck_a.state, ck_b.state], repair_inputs(network, network.shape_data(task).x_train))
        merge = lambda a_, b_, al: merge_pair(a_, b_, al, network=network, reset_x=reset_x, repairer=fixer)
    else:
        metric, merge = network.metric(task, split, reset_bn), interpolate
    with progress_bar("evaluating") as bar:
        curve = interpolation_curve(ck_a.state, ck_b.state, metric, alphas, merge=merge,
                                    on_point=lambda done, total: bar(done, total, "alphas"))
    notes = [n for n in (network.data_note, network.shape_data(task).note) if n]
    data = {"a": ck_a.source, "b": ck_b.source, "dataset": dataset, "split": split, "reset_bn": reset_bn,
            "repair": repair, **curve.to_dict(), "notes": notes}
    if plot is not None:
        save_plot(curve, plot, f"{Path(a).name} -> {Path(b).name} ({dataset}, {split})")
        data["plot"] = str(plot)
    if json_out:
        print_json(data)
    else:
        _table(data, curve, ck_a, ck_b, dataset, split, plot, notes)
    if network.assumption:
        warn(network.assumption)
    import math

    bad = [al for al, lo in zip(curve.alphas, curve.losses) if not math.isfinite(lo)]
    if bad:  # (JSON writes them as null)
        warn(f"the loss is not finite at alpha {', '.join(f'{al:g}' for al in bad[:5])}"
             f"{' and more' if len(bad) > 5 else ''}: the model's outputs overflow there (weights or inputs too "
             "large), so the barrier and AUC are undefined")


def _table(data, curve, ck_a, ck_b, dataset, split, plot, notes) -> None:
    from rich.table import Table

    how = ", ".join(w for w, on in (("BatchNorm reset", data["reset_bn"]), ("REPAIRed", data["repair"])) if on)
    table = Table("alpha", "loss", "accuracy", title=f"interpolation {ck_a.source} -> {ck_b.source} ({dataset} {split}"
                  + (f"; each merge {how}" if how else "") + ")")
    for al, lo, ac in zip(curve.alphas, curve.losses, curve.accuracies):
        table.add_row(f"{al:.2f}", f"{lo:.4f}", f"{ac:.4f}")
    con = console()
    con.print(table)
    con.print(f"loss barrier {curve.barrier:.4f}   AUC {curve.auc:.4f}" + (f"   plot {plot}" if plot else ""))
    for note in notes:
        con.print(f"note: {note}")


def _require_matplotlib() -> None:
    from modelmerge.errors import ModelMergeError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ModelMergeError("--plot needs matplotlib; install it with pip install 'modelmerge-align[plot]'") from None


def save_plot(curve, path: Path, title: str) -> None:
    """Write loss and accuracy against alpha as a PNG (atomically)."""
    import matplotlib

    from modelmerge.checkpoint import atomic_path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(curve.alphas, curve.losses, marker="o")
    ax1.set(xlabel="alpha", ylabel="loss", title=f"barrier {curve.barrier:.3f}")
    ax2.plot(curve.alphas, curve.accuracies, marker="o", color="tab:green")
    ax2.set(xlabel="alpha", ylabel="accuracy")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
