"""``modelmerge spec``: write the permutation spec of a model or checkpoint for reuse and editing."""

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
    console,
    handle_errors,
    load,
    resolve,
    warn,
    write_json,
)

EXAMPLES = """
Examples:

  modelmerge spec a.safetensors --model mymodels:ResNet20 -o resnet20.spec.json

  modelmerge spec a.safetensors -o spec.json        # inferred from the state dict
"""


@handle_errors
def spec_command(
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint of the model (file or hub id).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the spec (.json).")],
    model: ModelOpt = None,
    model_kwargs: ModelKwargs = None,
    input_shape: InputShape = None,
    assume_chain: AssumeChain = False,
    revision: Revision = None,
    force: Force = False,
) -> None:
    """Trace (--model) or infer the permutation spec and write it as JSON (docs/spec-format.md)."""
    from modelmerge.checkpoint import check_output_path

    check_output_path(output, [checkpoint], force, suffix=".json")
    ck = load(checkpoint, revision)
    network = resolve(ck, None, model, model_kwargs, input_shape, assume_chain)
    write_json(output, network.spec.to_dict(), [checkpoint], force)
    con = console()
    units = sum(network.spec.groups.values())
    con.print(f"wrote {output}: {network.spec_source} spec, {len(network.spec.groups)} groups, {units} units, "
              f"{len(network.spec.fixed)} fixed parameter{'' if len(network.spec.fixed) == 1 else 's'}")
    for w in (*network.warnings, *network.risks):
        con.print(f"traced: {w}")
    if network.assumption:
        warn(network.assumption)
