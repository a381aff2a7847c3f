"""``modelmerge align A B -o OUT``: permute B's hidden units onto A's."""

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
    ModelKwargs,
    ModelOpt,
    Revision,
    Seed,
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

#: align()'s defaults (not imported from it: `--help` stays free of torch)
MAX_ITER, REFINE_STEPS = 100, 100

EXAMPLES = """
Examples:

  modelmerge align a.safetensors b.safetensors -o b_aligned.safetensors

  modelmerge align a.pt b.pt -o b_aligned.safetensors --merged merged.safetensors --alpha 0.5

  modelmerge align a.safetensors b.safetensors -o out.safetensors --spec spec.json --report report.json
"""


@handle_errors
def align_command(
    a: Annotated[str, typer.Argument(help="Reference checkpoint A (file or hub id).")],
    b: Annotated[str, typer.Argument(help="Checkpoint B to permute onto A (file or hub id).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write aligned B (.safetensors).")],
    merged: Annotated[
        Path | None, typer.Option("--merged", help="Also write the merge (1-alpha)*A + alpha*aligned B.")
    ] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of B in --merged.")] = 0.5,
    method: Annotated[
        str, typer.Option("--method", help="auto | deep-align | weight-matching | activation-matching (auto: "
                          "the bundled learned aligner when the network is in its family, else weight matching; "
                          "activation-matching needs --data).")
    ] = "auto",
    aligner: Annotated[
        str | None, typer.Option("--aligner", help="Bundled aligner name, or a folder/file from train-aligner.")
    ] = None,
    refine: Annotated[
        str | None, typer.Option("--refine", help="none | wm (weight matching from the answer) | lmc (short LMC "
                                 "optimisation; needs --data). Default: lmc for auto with --data, else none.")
    ] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="digits | mnist1d | teacher | FILE (train split): auto then also "
                                 "tries weight matching and activation matching, refines the best by LMC and keeps "
                                 "the lowest merge loss; also read by --refine lmc, --method activation-matching, "
                                 "--reset-bn and --repair.")
    ] = None,
    spec: SpecFile = None,
    model: ModelOpt = None,
    model_kwargs: ModelKwargs = None,
    input_shape: InputShape = None,
    assume_chain: AssumeChain = False,
    reset_bn: Annotated[
        bool, typer.Option("--reset-bn", help="Recompute the merge's BatchNorm statistics on --data (train split).")
    ] = False,
    repair: Annotated[
        bool, typer.Option("--repair", help="REPAIR the merge: rescale its hidden units to the interpolated "
                           "statistics of A's and aligned B's on --data (train split; after --reset-bn).")
    ] = False,
    report: Annotated[Path | None, typer.Option("--report", help="Write the JSON report here.")] = None,
    json_out: JsonOut = False,
    seed: Seed = 0,
    max_iter: Annotated[int, typer.Option("--max-iter", min=1, help="Weight-matching sweeps at most.")] = MAX_ITER,
    refine_steps: Annotated[int, typer.Option("--refine-steps", min=1, help="LMC refinement steps at most (--refine lmc, "
                                              "auto --data); each is one weight-matching projection; stops after half as "
                                              "many without a better answer.")] = REFINE_STEPS,
    revision: Revision = None,
    threads: Threads = None,
    force: Force = False,
) -> None:
    """Align B to A: find per-layer permutations of B's hidden units and write permuted B."""
    t0 = time.perf_counter()
    from modelmerge.alignment import align, uses_data
    from modelmerge.data import load_dataset

    _check_options([a, b, data, spec, aligner], output, merged, report, alpha, method, refine, data, reset_bn, repair,
                   seed, force, refine_steps)
    set_threads(threads)
    ck_a, ck_b = load(a, revision), load(b, revision)
    check_records([ck_a, ck_b])
    network = resolve(ck_a, spec, model, model_kwargs, input_shape, assume_chain)
    task = load_dataset(data) if reset_bn or repair else None  # align() loads it itself when it reads it
    dataset = network.bn_inputs(task) if reset_bn else None  # checked before any work
    repair_x = None
    if repair:
        from modelmerge.repair import repair_inputs

        repair_x = repair_inputs(network, network.shape_data(task).x_train, seed)
    with progress_bar("LMC refinement") as bar, progress_bar("weight matching") as wm_bar:
        result = align(ck_a.state, ck_b.state, network=network, method=method, aligner=aligner, refine=refine,
                       # --data that align does not read is refused there, unless --reset-bn/--repair read it
                       data=data if uses_data(method, refine) or not (reset_bn or repair) else None, seed=seed,
                       max_iter=max_iter, refine_steps=refine_steps,
                       on_refine=lambda done, total, loss: bar(done, total, f"best merged loss {loss:.4f}"),
                       on_progress=lambda done, total: wm_bar(done, total, "group visits"))
    written = _write(result, ck_a, ck_b, output, merged, alpha, dataset, repair_x, force)
    data = result.report()
    if max_iter != MAX_ITER and "weight_matching" not in result.seconds and refine != "wm":
        data["notes"].append(f"--max-iter {max_iter} had no effect: it bounds weight matching as a method or "
                             f"--refine wm, and the answer is {result.method}'s")
    data["seconds"]["total"] = time.perf_counter() - t0
    data["inputs"] = {"a": ck_a.source, "b": ck_b.source, "a_sha256": ck_a.sha256, "b_sha256": ck_b.sha256}
    # how the files were read (which of several state dicts, entries dropped), as stderr said it
    data["warnings"] = [*ck_a.notes, *ck_b.notes, *data.get("warnings", [])]
    data["outputs"] = {"aligned": written[0], "merged": written[1] if merged is not None else None}
    if report is not None:
        write_json(report, data, [a, b], force)
    if json_out:
        print_json(data)
    else:
        _summary(data, result)
    for message in result.warnings:
        warn(message)


def _check_options(inputs, output, merged, report, alpha, method, refine, data, reset_bn, repair, seed, force,
                   refine_steps=REFINE_STEPS) -> None:
    """Refuse bad option combinations and unsafe outputs (over any file read: ``inputs``) before any work."""
    from modelmerge.alignment import METHODS, REFINES
    from modelmerge.checkpoint import check_output_path, resolved
    from modelmerge.errors import ModelMergeError, OutputError, check_seed
    from modelmerge.merge import ALPHA_LIMIT

    check_seed(seed)
    if method not in METHODS:
        raise ModelMergeError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if refine is not None and refine not in REFINES:
        raise ModelMergeError(f"unknown --refine {refine!r}; choose one of {', '.join(REFINES)}")
    lmc = refine == "lmc" or (refine is None and method == "auto" and data is not None)
    if refine_steps != REFINE_STEPS and not lmc:
        raise ModelMergeError("--refine-steps sets the LMC refinement's steps, which runs with --refine lmc or auto "
                              "--data; drop it or add one of those")
    if reset_bn and (merged is None or data is None):
        raise ModelMergeError("--reset-bn needs --merged (the model to reset) and --data (the data to reset on)")
    if repair and (merged is None or data is None):
        raise ModelMergeError("--repair needs --merged (the model to repair) and --data (the data to measure on)")
    if merged is None and alpha != 0.5:
        raise ModelMergeError("--alpha sets the mix of the --merged model; add --merged FILE (or drop --alpha)")
    if merged is not None and not -ALPHA_LIMIT <= alpha <= ALPHA_LIMIT:  # NaN fails this too
        raise ModelMergeError(f"--alpha must be a finite number from -{ALPHA_LIMIT:g} to {ALPHA_LIMIT:g}, got {alpha}")
    outputs = [output] + [p for p in (merged, report) if p is not None]
    if len({resolved(p) for p in outputs}) < len(outputs):
        raise OutputError("-o, --merged and --report must be different files")
    check_output_path(output, inputs, force)
    if merged is not None:
        check_output_path(merged, inputs, force)
    if report is not None:
        check_output_path(report, inputs, force, suffix=".json")


def _write(result, ck_a, ck_b, output, merged, alpha, reset_x, repair_x, force) -> list[str]:
    """Write aligned B, then the merge (BatchNorm statistics recomputed on ``reset_x``, REPAIRed on
    ``repair_x``, where given)."""
    from modelmerge.checkpoint import provenance
    from modelmerge.repair import Repair, merge_pair

    inputs = [ck_a.source, ck_b.source]
    meta = provenance(result.method, ck_a, ck_b, arch_of=ck_b, own_of=(ck_b,))
    mixed = None
    if merged is not None:  # computed before anything is written: a failure leaves no file
        fixer = Repair(result.network, [ck_a.state, result.aligned], repair_x) if repair_x is not None else None
        mixed = merge_pair(ck_a.state, result.aligned, alpha, network=result.network, reset_x=reset_x,
                           repairer=fixer)
    written = [save(result.aligned, output, meta, inputs, force)]
    if mixed is not None:
        mixed_meta = provenance(result.method, ck_a, ck_b, arch_of=ck_b, own_of=(ck_a, ck_b))
        written.append(save(mixed, merged, {**mixed_meta, "modelmerge.alpha": str(alpha),
                                            "modelmerge.reset_bn": str(reset_x is not None).lower(),
                                            "modelmerge.repair": str(repair_x is not None).lower()}, inputs, force))
    return written


def _summary(data: dict, result) -> None:
    from rich.table import Table

    spec = result.network.spec
    units = sum(spec.groups.values())
    table = Table(title="modelmerge align", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("method", data["method"] + (f" (aligner {data['aligner']})" if data.get("aligner") else ""))
    table.add_row("spec", f"{data['spec']['source']}: {len(spec.groups)} groups, {units} hidden units, "
                  f"{len(spec.fixed)} fixed parameter{'' if len(spec.fixed) == 1 else 's'}")
    obj = data["objective"]
    table.add_row("objective", f"{obj['before']:.4g} -> {obj['after']:.4g}  (sum <A, P(B)>)")
    import torch

    moved = sum(int((p != torch.arange(p.numel())).sum()) for p in result.perm.values())
    table.add_row("units moved", f"{moved} of {units}")
    if data["iterations"] is None:
        table.add_row("iterations", "one forward pass (learned)")
    elif data["converged"] is None:
        table.add_row("iterations", f"{data['iterations']} refinement steps")
    else:
        table.add_row("iterations", f"{data['iterations']} ({'converged' if data['converged'] else 'max-iter reached'})")
    table.add_row("verified", result.verification.describe())
    stages = ", ".join(f"{k} {v:.3f}" for k, v in data["seconds"].items())
    table.add_row("seconds", stages)
    for name, score in (data.get("candidates") or {}).items():
        table.add_row("candidate", f"{name}: merged loss {score:.4f}" + ("  <- kept" if name == data["method"] else ""))
    table.add_row("wrote", data["outputs"]["aligned"] + (f", {data['outputs']['merged']}" if data["outputs"]["merged"] else ""))
    for note in data["notes"]:
        table.add_row("note", note)
    console().print(table)
