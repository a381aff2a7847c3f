"""``modelmerge merge A B C … -o soup.safetensors``: align many models to one frame and average them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from modelmerge.cli._common import (
    AssumeChain,
    Force,
    InputShape,
    JsonOut,
    MergeSeed,
    ModelKwargs,
    ModelOpt,
    Revision,
    SpecFile,
    Threads,
    check_records,
    console,
    handle_errors,
    load,
    print_json,
    progress_bar,
    resolve,
    save,
    set_threads,
    warn,
    write_json,
)

EXAMPLES = """
Examples:

  modelmerge merge m1.safetensors m2.safetensors m3.safetensors m4.safetensors -o soup.safetensors --data digits

  modelmerge merge a.pt b.pt c.pt -o soup.safetensors --weights 0.5,0.25,0.25 --method weight-matching
"""


@handle_errors
def merge_command(
    models: Annotated[list[str], typer.Argument(help="Two or more checkpoints of one architecture.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the soup (.safetensors).")],
    weights: Annotated[
        str | None, typer.Option("--weights", help="Comma-separated share of each model, >= 0, summing to 1 "
                                 "(default: equal).")
    ] = None,
    method: Annotated[
        str, typer.Option("--method", help="weight-matching (MergeMany: each model re-aligned to the average of "
                          "the others until stable) | auto | deep-align | activation-matching (each aligned to "
                          "the first model).")
    ] = "weight-matching",
    data: Annotated[
        str | None, typer.Option("--data", help="digits | mnist1d | teacher | FILE: report every model's and the "
                                 "soup's test loss and accuracy (and read by activation-matching, auto, --reset-bn).")
    ] = None,
    reset_bn: Annotated[
        bool, typer.Option("--reset-bn", help="Recompute the soup's BatchNorm statistics on --data (train split).")
    ] = False,
    repair: Annotated[
        bool, typer.Option("--repair", help="REPAIR the soup: rescale its hidden units to the weighted statistics "
                           "of the aligned models on --data (train split; after --reset-bn).")
    ] = False,
    aligner: Annotated[
        str | None, typer.Option("--aligner", help="Bundled aligner name or trained folder (auto, deep-align).")
    ] = None,
    spec: SpecFile = None,
    model: ModelOpt = None,
    model_kwargs: ModelKwargs = None,
    input_shape: InputShape = None,
    assume_chain: AssumeChain = False,
    max_iter: Annotated[int, typer.Option("--max-iter", min=1, help="MergeMany sweeps at most.")] = 20,
    report: Annotated[Path | None, typer.Option("--report", help="Write the JSON report here.")] = None,
    json_out: JsonOut = False,
    seed: MergeSeed = 0,
    revision: Revision = None,
    threads: Threads = None,
    force: Force = False,
) -> None:
    """Align N models to one frame and write their weighted average (a model soup)."""
    t0 = time.perf_counter()
    import torch

    from modelmerge.alignment import METHODS
    from modelmerge.checkpoint import check_output_path, provenance
    from modelmerge.errors import ModelMergeError, OutputError, check_seed
    from modelmerge.soup import check_weights, merge_many

    check_seed(seed)
    if len(models) < 2:
        raise ModelMergeError(f"merge needs at least two checkpoints, got {len(models)}")
    if method not in METHODS:
        raise ModelMergeError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    try:
        shares = check_weights([float(x) for x in weights.split(",")] if weights is not None else None, len(models))
    except ValueError:
        raise ModelMergeError(f"--weights {weights!r} is not a comma-separated list of numbers") from None
    if (reset_bn or repair) and data is None:
        raise ModelMergeError(f"{'--reset-bn' if reset_bn else '--repair'} needs --data (the data to measure "
                              "statistics on)")
    if aligner is not None and method in ("weight-matching", "activation-matching"):
        raise ModelMergeError(f"--aligner is read by --method auto and deep-align, not {method}")
    from modelmerge.checkpoint import resolved

    if report is not None and resolved(report) == resolved(output):
        raise OutputError("-o and --report must be different files")
    read = [*models, data, spec, aligner]
    check_output_path(output, read, force)
    if report is not None:
        check_output_path(report, read, force, suffix=".json")
    set_threads(threads)
    cks = [load(m, revision) for m in models]
    check_records(cks)
    network = resolve(cks[0], spec, model, model_kwargs, input_shape, assume_chain)
    dataset = task = bn_x = repair_x = None
    if data is not None:
        from modelmerge.data import load_dataset

        dataset = load_dataset(data)
        task = network.shape_data(dataset)  # fits the network, before any work
        bn_x = network.bn_inputs(dataset) if reset_bn else None
        if repair:
            from modelmerge.activations import producers
            from modelmerge.repair import repair_inputs

            if not producers(network):  # fail before the alignment, not after it
                raise ModelMergeError("--repair: no Linear/Conv/norm layer produces a permutation group's units")
            repair_x = repair_inputs(network, task.x_train, seed)
    reads_data = method in ("auto", "activation-matching")
    with progress_bar("aligning models") as bar:
        result = merge_many([ck.state for ck in cks], network, weights=shares, method=method,
                            data=dataset if reads_data else None, aligner=aligner, max_iter=max_iter, seed=seed,
                            on_progress=lambda done, total: bar(done, total, "model visits"))
    soup = network.reset_bn(result.soup, bn_x) if bn_x is not None else result.soup
    if repair_x is not None:
        from modelmerge.repair import repair as repair_soup

        soup = repair_soup(network, soup, result.aligned, shares, repair_x)
    scores = _scores(network, task, cks, soup, shares, reset_bn) if task is not None else None
    meta = provenance(f"merge-{result.method}", arch_of=cks[0], own_of=cks, weights=shares,
                      reset_bn=str(reset_bn).lower(), repair=str(repair).lower(),
                      inputs=[{"source": ck.source, "sha256": ck.sha256} for ck in cks])
    written = save(soup, output, meta, list(models), force)
    out = {
        "method": result.method, "models": [ck.source for ck in cks], "weights": shares,
        "sweeps": result.sweeps, "converged": result.converged,
        "units_moved": [sum(int((p != torch.arange(p.numel())).sum()) for p in perm.values())
                        for perm in result.perms],
        "verified": [v.describe() for v in result.verifications],
        "max_abs_diff": [v.max_abs_diff if v.forward is not None else None for v in result.verifications],
        "scores": scores, "reset_bn": reset_bn, "repair": repair,
        "seconds": {"align": result.seconds, "total": time.perf_counter() - t0}, "output": written,
        # how the data was read (e.g. 8-bit pixels as 0..255), as align, evaluate and interpolate say it
        "notes": [n for n in (network.data_note, task.note) if n] if task is not None else [],
    }
    if report is not None:
        write_json(report, out, list(models), force)
    if json_out:
        print_json(out)
    else:
        _summary(out)
    for message in network.warnings:  # what the tracer could not follow, as align says it
        warn(f"traced: {message}")
    for message in network.risks:
        warn(message)
    if network.assumption:
        warn(network.assumption)
    first = cks[0].state
    differ = [(k, i) for i, ck in enumerate(cks[1:], start=2) for k, v in ck.state.items() if v.dtype != first[k].dtype]
    if differ:  # averaged in float32, written in model 1's dtypes: say so rather than narrow the others silently
        k, i = differ[0]
        warn(f"the models differ in dtype ({k}: model 1 {first[k].dtype}, model {i} {cks[i - 1].state[k].dtype}"
             f"{f', and {len(differ) - 1} more' if len(differ) > 1 else ''}); the soup was computed in at least "
             "float32 and written in model 1's dtypes")


def _scores(network, task, cks, soup, shares, reset_bn) -> dict:
    """Test loss and accuracy of every model, the soup as written and the naive (unaligned) average
    (BatchNorm statistics recomputed for the models and the naive average with ``reset_bn``; the
    written soup already had them recomputed)."""
    from modelmerge.soup import average

    metric = network.metric(task, "test", reset_bn=reset_bn)
    out = {}
    for i, ck in enumerate(cks, start=1):  # keyed by position: the same file may be given twice
        loss, acc = metric(ck.state)
        out[f"model {i}"] = {"source": ck.source, "loss": loss, "accuracy": acc}
    loss, acc = network.metric(task, "test")(soup)
    out["soup"] = {"loss": loss, "accuracy": acc}
    loss, acc = metric(average([ck.state for ck in cks], shares))
    out["naive average"] = {"loss": loss, "accuracy": acc}
    return out


def _summary(out: dict) -> None:
    import math

    from rich.table import Table

    con = console()
    table = Table(title="modelmerge merge", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    how = (f"{out['sweeps']} sweep(s), {'converged' if out['converged'] else 'max-iter reached'}"
           if out["converged"] is not None else "each aligned to the first model")
    table.add_row("method", f"{out['method']} ({how})")
    table.add_row("models", f"{len(out['models'])}, weights {', '.join(f'{w:.3g}' for w in out['weights'])}")
    table.add_row("units moved", ", ".join(map(str, out["units_moved"])))
    diffs = out["max_abs_diff"]
    worst = max(range(len(diffs)), key=lambda i: math.inf if diffs[i] is None else diffs[i])  # unverified first
    table.add_row("verified", f"{len(diffs)} aligned models; worst: {out['verified'][worst]}")
    reset = " (BatchNorm statistics recomputed)" if out.get("reset_bn") else ""
    for name, s in (out["scores"] or {}).items():
        label = f"{name} ({Path(s['source']).name})" if "source" in s else name
        fixed = reset + (" (REPAIRed)" if name == "soup" and out.get("repair") else "")
        table.add_row(label, f"test loss {s['loss']:.4f}, accuracy {s['accuracy']:.4f}{fixed}")
    table.add_row("seconds", ", ".join(f"{k} {v:.3f}" for k, v in out["seconds"].items()))
    table.add_row("wrote", out["output"])
    con.print(table)
    for note in out["notes"]:
        con.print(f"note: {note}")
