"""``modelmerge align A B -o OUT``: permute B's hidden units onto A's."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from modelmerge.cli._common import (
    Force, InputShape, JsonOut, ModelKwargs, ModelOpt, Revision, Seed, SpecFile, Threads, console,
    handle_errors, model_option, print_json, progress_bar, reset_bn_module, set_threads, write_json,
)

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
        str, typer.Option("--method", help="auto | deep-align | weight-matching (auto: the bundled learned "
                          "aligner when the network is in its family, else weight matching).")
    ] = "auto",
    aligner: Annotated[
        str | None, typer.Option("--aligner", help="Bundled aligner name, or a folder/file from train-aligner.")
    ] = None,
    refine: Annotated[
        str, typer.Option("--refine", help="none | wm (weight matching from the learned answer) | "
                          "lmc (short LMC optimisation; needs --data).")
    ] = "none",
    data: Annotated[
        str | None, typer.Option("--data", help="digits | mnist1d | FILE: for --refine lmc, and for auto to "
                                 "also try weight matching and LMC refinement and keep the best merge.")
    ] = None,
    spec: SpecFile = None,
    model: ModelOpt = None,
    model_kwargs: ModelKwargs = None,
    input_shape: InputShape = None,
    reset_bn: Annotated[
        bool, typer.Option("--reset-bn", help="Recompute the merge's BatchNorm statistics on --data (train split).")
    ] = False,
    report: Annotated[Path | None, typer.Option("--report", help="Write the JSON report here.")] = None,
    json_out: JsonOut = False,
    seed: Seed = 0,
    max_iter: Annotated[int, typer.Option("--max-iter", min=1, help="Weight-matching sweeps at most.")] = 100,
    refine_steps: Annotated[int, typer.Option("--refine-steps", min=1, help="LMC refinement steps (--refine lmc, "
                                              "auto --data); each is one weight-matching projection.")] = 100,
    revision: Revision = None,
    threads: Threads = None,
    force: Force = False,
) -> None:
    """Align B to A: find per-layer permutations of B's hidden units and write permuted B."""
    t0 = time.perf_counter()
    from modelmerge.align import METHODS, REFINES, align
    from modelmerge.checkpoint import check_output_path, load_checkpoint, provenance, save_checkpoint
    from modelmerge.errors import ModelMergeError, OutputError
    from modelmerge.merge import interpolate
    from modelmerge.spec import PermutationSpec

    if method not in METHODS:
        raise ModelMergeError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if refine not in REFINES:
        raise ModelMergeError(f"unknown --refine {refine!r}; choose one of {', '.join(REFINES)}")
    if reset_bn and (merged is None or data is None):
        raise ModelMergeError("--reset-bn needs --merged (the model to reset) and --data (the data to reset on)")
    if refine != "none" and method == "weight-matching":
        raise ModelMergeError("--refine applies to the learned answer; use --method deep-align or auto")
    inputs = [a, b]
    outputs = [output] + [p for p in (merged, report) if p is not None]
    if len({Path(p).expanduser().resolve() for p in outputs}) < len(outputs):
        raise OutputError("-o, --merged and --report must be different files")
    # Fail on unsafe outputs before any work is done.
    check_output_path(output, inputs, force)
    if merged is not None:
        check_output_path(merged, inputs, force)
    if report is not None:
        check_output_path(report, inputs, force, suffix=".json")
    set_threads(threads)

    given_spec = PermutationSpec.load(spec) if spec is not None else None
    ck_a = load_checkpoint(a, revision)
    ck_b = load_checkpoint(b, revision)
    model_spec = model_option(model, model_kwargs, input_shape, ck_a.state)
    with progress_bar("LMC refinement") as bar:
        result = align(ck_a.state, ck_b.state, spec=given_spec, record=ck_a.arch, model=model_spec, method=method,
                       aligner=aligner, refine=refine, data=data, seed=seed, max_iter=max_iter,
                       refine_steps=refine_steps,
                       on_refine=lambda done, total, loss: bar(done, total, f"best merged loss {loss:.4f}"))

    meta = provenance(result.method, ck_a, ck_b)
    if ck_b.arch is not None:
        meta["modelmerge.arch"] = ck_b.metadata["modelmerge.arch"]
    save_checkpoint(result.aligned, output, meta, inputs, force)
    if merged is not None:
        mixed = interpolate(ck_a.state, result.aligned, alpha)
        if reset_bn:
            from modelmerge.bnreset import inputs_for, reset_bn_state
            from modelmerge.zoo.data import load_dataset

            module, shape = reset_bn_module(ck_a.arch, model_spec, ck_a.state)
            mixed = reset_bn_state(mixed, module, inputs_for(load_dataset(data), shape)[0])
        save_checkpoint(mixed, merged, {**meta, "modelmerge.alpha": str(alpha),
                                        "modelmerge.reset_bn": str(reset_bn).lower()}, inputs, force)
    data = result.report()
    data["seconds"]["total"] = time.perf_counter() - t0
    data["inputs"] = {"a": ck_a.source, "b": ck_b.source, "a_sha256": ck_a.sha256, "b_sha256": ck_b.sha256}
    data["outputs"] = {"aligned": str(output), "merged": str(merged) if merged else None}
    if report is not None:
        write_json(report, data, inputs, force)
    if json_out:
        print_json(data)
    else:
        _summary(data, result)


def _summary(data: dict, result) -> None:
    from rich.table import Table

    spec = result.spec.spec
    units = sum(spec.groups.values())
    table = Table(title="modelmerge align", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("method", data["method"] + (f" (aligner {data['aligner']})" if data.get("aligner") else ""))
    table.add_row("spec", f"{data['spec']['source']}: {len(spec.groups)} groups, {units} hidden units, "
                  f"{len(spec.fixed)} fixed parameters")
    obj = data["objective"]
    table.add_row("objective", f"{obj['before']:.4g} -> {obj['after']:.4g}  (sum <A, P(B)>)")
    import torch

    moved = sum(int((p != torch.arange(p.numel())).sum()) for p in result.perm.values())
    table.add_row("units moved", f"{moved} of {units}")
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
