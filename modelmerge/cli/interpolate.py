"""``modelmerge interpolate A B -o OUT --alpha 0.5``: per-tensor linear interpolation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelmerge.cli._common import (
    Force, InputShape, ModelKwargs, ModelOpt, Revision, console, handle_errors, model_option, reset_bn_module,
)


@handle_errors
def interpolate_command(
    a: Annotated[str, typer.Argument(help="Checkpoint A (alpha = 0).")],
    b: Annotated[str, typer.Argument(help="Checkpoint B, already aligned to A (alpha = 1).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the merge (.safetensors).")],
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of B: (1-alpha)*A + alpha*B.")] = 0.5,
    reset_bn: Annotated[
        bool, typer.Option("--reset-bn", help="Recompute BatchNorm statistics of the merge on --dataset.")
    ] = False,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="digits | mnist1d | FILE: data for --reset-bn (train split).")
    ] = None,
    model: ModelOpt = None,
    model_kwargs: ModelKwargs = None,
    input_shape: InputShape = None,
    revision: Revision = None,
    force: Force = False,
) -> None:
    """Write (1-alpha)*A + alpha*B per tensor (integer buffers are copied from A)."""
    from modelmerge.checkpoint import check_output_path, load_checkpoint, provenance, save_checkpoint
    from modelmerge.merge import interpolate

    from modelmerge.errors import ModelMergeError

    if reset_bn and dataset is None:
        raise ModelMergeError("--reset-bn needs --dataset (the data to recompute statistics on)")
    check_output_path(output, [a, b], force)
    ck_a = load_checkpoint(a, revision)
    ck_b = load_checkpoint(b, revision)
    model_spec = model_option(model, model_kwargs, input_shape, ck_a.state)
    merged = interpolate(ck_a.state, ck_b.state, alpha)
    if reset_bn:
        from modelmerge.bnreset import inputs_for, reset_bn_state
        from modelmerge.zoo.data import load_dataset

        module, shape = reset_bn_module(ck_a.arch, model_spec, ck_a.state)
        merged = reset_bn_state(merged, module, inputs_for(load_dataset(dataset), shape)[0])
    meta = provenance("interpolate", ck_a, ck_b, alpha=str(alpha), reset_bn=str(reset_bn).lower())
    if ck_a.arch is not None:
        meta["modelmerge.arch"] = ck_a.metadata["modelmerge.arch"]
    save_checkpoint(merged, output, meta, [a, b], force)
    console().print(f"wrote {output}: (1-{alpha})*A + {alpha}*B over {len(merged)} tensors"
                    + (f", BatchNorm statistics recomputed on {dataset}" if reset_bn else ""))
