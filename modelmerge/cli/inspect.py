"""``modelmerge inspect CKPT``: the permutation spec modelmerge sees in a checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from modelmerge.cli._common import (
    AssumeChain,
    InputShape,
    ModelKwargs,
    ModelOpt,
    Revision,
    SpecFile,
    console,
    handle_errors,
    print_json,
    resolve,
    warn,
)


@handle_errors
def inspect_command(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint file or hub id.")],
    spec: SpecFile = None,
    model: ModelOpt = None,
    model_kwargs: ModelKwargs = None,
    input_shape: InputShape = None,
    assume_chain: AssumeChain = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the spec as JSON (the --spec file format) on stdout.")
    ] = False,
    revision: Revision = None,
) -> None:
    """Show the permutation groups, their sizes, the parameters each touches, and what is fixed."""
    from modelmerge.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint, revision)
    network = resolve(ck.state, spec, ck.arch, model, model_kwargs, input_shape, assume_chain)
    s = network.spec
    if json_out:
        print_json(s.to_dict())
        return
    from rich.table import Table

    n_params = sum(t.numel() for t in ck.state.values())
    con = console()
    con.print(f"[bold]{ck.source}[/]: {len(ck.state)} tensors, {n_params:,} values; spec {network.spec_source}"
              + (f", chain of {network.depth} layers" if network.chain else ""))
    table = Table("group", "size", "acts on (parameter:axis, xk = blocks of k)")
    for g, n in s.groups.items():
        members = []
        for p, ax in s.members(g):
            k = ck.state[p].shape[ax] // n
            members.append(f"{p}:{ax}" + (f" x{k}" if k > 1 else ""))
        table.add_row(g, str(n), ", ".join(members))
    con.print(table)
    con.print(f"fixed (no group): {', '.join(s.fixed) or 'none'}")
    con.print("input and output units are never permuted")
    for w in network.warnings:
        con.print(f"traced: {w}")
    if network.assumption:
        warn(network.assumption)
