"""``modelmerge interpolate A B -o OUT --alpha 0.5``: per-tensor linear interpolation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelmerge.cli._common import (
    AssumeChain,
    Force,
    InputShape,
    ModelKwargs,
    ModelOpt,
    Revision,
    check_record_fits,
    check_records,
    console,
    handle_errors,
    load,
    resolve,
    save,
    warn,
)

EXAMPLES = """
Examples:

  modelmerge interpolate a.safetensors b_aligned.safetensors -o merged.safetensors --alpha 0.5

  modelmerge interpolate a.safetensors b_aligned.safetensors -o m.safetensors --repair --dataset digits
"""


@handle_errors
def interpolate_command(
    a: Annotated[str, typer.Argument(help="Checkpoint A (alpha = 0).")],
    b: Annotated[str, typer.Argument(help="Checkpoint B, already aligned to A (alpha = 1).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the merge (.safetensors).")],
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of B: (1-alpha)*A + alpha*B.")] = 0.5,
    reset_bn: Annotated[
        bool, typer.Option("--reset-bn", help="Recompute BatchNorm statistics of the merge on --dataset.")
    ] = False,
    repair: Annotated[
        bool, typer.Option("--repair", help="REPAIR: rescale the merge's hidden units to the interpolated "
                           "statistics of A's and B's, measured on --dataset (train split).")
    ] = False,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="digits | mnist1d | teacher | FILE: data for --reset-bn and "
                                 "--repair (train split).")
    ] = None,
    model: ModelOpt = None,
    model_kwargs: ModelKwargs = None,
    input_shape: InputShape = None,
    assume_chain: AssumeChain = False,
    revision: Revision = None,
    force: Force = False,
) -> None:
    """Write (1-alpha)*A + alpha*B per tensor (integer buffers are copied from A; integer tensors that
    differ between A and B, such as int8-quantized weights, are refused)."""
    from modelmerge.checkpoint import (
        check_output_path,
        provenance,
    )
    from modelmerge.errors import ModelMergeError, preview
    from modelmerge.merge import check_mergeable, check_same_architecture, interpolate

    if (reset_bn or repair) and dataset is None:
        raise ModelMergeError(f"{'--reset-bn' if reset_bn else '--repair'} needs --dataset (the data to measure "
                              "statistics on)")
    if not (reset_bn or repair) and (dataset is not None or model is not None or model_kwargs is not None
                                     or input_shape is not None or assume_chain):
        raise ModelMergeError("--dataset, --model, --model-kwargs, --input-shape and --assume-chain are used by "
                              "--reset-bn and --repair only; drop them or add one of those")
    check_output_path(output, [a, b, dataset], force)
    ck_a, ck_b = load(a, revision), load(b, revision)
    check_records([ck_a, ck_b])
    check_same_architecture(ck_a.state, ck_b.state)
    check_mergeable(ck_a.state, ck_b.state)
    if reset_bn or repair:
        from modelmerge.data import load_dataset
        from modelmerge.repair import Repair, merge_pair, repair_inputs

        network = resolve(ck_a, None, model, model_kwargs, input_shape, assume_chain, spec_needed=repair)
        data = load_dataset(dataset)
        reset_x = network.bn_inputs(data) if reset_bn else None
        fixer = Repair(network, [ck_a.state, ck_b.state], repair_inputs(network, network.shape_data(data).x_train)
                       ) if repair else None
        merged = merge_pair(ck_a.state, ck_b.state, alpha, network=network, reset_x=reset_x, repairer=fixer)
    else:
        network = data = None
        check_record_fits(ck_a)  # the output carries A's record: it must describe these tensors
        merged = interpolate(ck_a.state, ck_b.state, alpha)
    meta = provenance("interpolate", ck_a, ck_b, arch_of=ck_a, own_of=(ck_a, ck_b), alpha=str(alpha), reset_bn=str(reset_bn).lower(),
                      repair=str(repair).lower())
    save(merged, output, meta, [a, b], force)
    differ = [k for k, v in ck_a.state.items() if v.dtype != ck_b.state[k].dtype]
    if differ:  # computed in float32, written in A's dtype: say so rather than change B's silently
        k = differ[0]
        warn(f"A and B differ in dtype at {preview(differ, 3)} ({ck_a.state[k].dtype} vs {ck_b.state[k].dtype}); "
             "the merge was computed in at least float32 and written in A's dtypes")
    copied = [k for k, v in ck_a.state.items() if not v.is_floating_point()]
    console().print(f"wrote {output}: {1 - alpha:g}*A + {alpha:g}*B over {len(merged) - len(copied)} tensors"
                    + (f"; {len(copied)} integer/bool buffer(s) copied from A, never interpolated "
                       f"({preview(copied, 3)})" if copied else "")
                    + (f", BatchNorm statistics recomputed on {dataset}" if reset_bn else "")
                    + ((f", unit statistics REPAIRed on {dataset}" if alpha not in (0.0, 1.0) else
                        f"; --repair changed nothing: at alpha {alpha:g} the merge has {'A' if alpha == 0 else 'B'}'s "
                        "weights, whose unit statistics are REPAIR's targets") if repair else ""))
    if network is not None:
        for note in (network.data_note, network.shape_data(data).note):
            if note:
                console().print(f"note: {note}")
        if network.assumption:
            warn(network.assumption)
