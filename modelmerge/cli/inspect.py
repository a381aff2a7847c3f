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
    load,
    print_json,
    resolve,
    warn,
)

EXAMPLES = """
Examples:

  modelmerge inspect a.safetensors

  modelmerge inspect a.pt --model mymodels:ResNet20 --json > spec.json
"""


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
    ck = load(checkpoint, revision)
    network = resolve(ck, spec, model, model_kwargs, input_shape, assume_chain)
    s = network.spec
    if json_out:
        print_json(s.to_dict())
        return
    n_params = sum(t.numel() for t in ck.state.values())
    con = console()
    con.print(f"[bold]{ck.source}[/]: {len(ck.state)} tensors, {n_params:,} values; spec {network.spec_source}"
              + (f", chain of {network.depth} layers" if network.chain else ""))
    # one block per group, not a table: parameter names are long and must never be cut
    heads = {g: (name, hs) for name, hs in s.heads.items() for g in hs.groups}
    con.print("groups (parameter:axis; \\[a:b] = a segment of the axis; xk = blocks of k):")
    for g, n in s.groups.items():
        members, matrices = [], 0
        for p, ax in s.members(g):
            for seg, start, length in s.segments(p, ax, ck.state[p].shape[ax]):
                if seg != g:
                    continue
                k = length // n
                part = f"\\[{start}:{start + length}]" if length != ck.state[p].shape[ax] else ""
                members.append(f"{p}:{ax}{part}" + (f" x{k}" if k > 1 else ""))
            matrices += ck.state[p].ndim >= 2
        kind = _structure(g, n, heads.get(g), matrices)
        con.print(f"  [bold]{g}[/]  {n} units" + (f"; {kind}" if kind else ""), highlight=False)
        con.print("    " + ", ".join(dict.fromkeys(members)), highlight=False)
    con.print(f"fixed (no group): {', '.join(s.fixed) or 'none'}")
    if network.spec_source == "file":  # a user's spec is read as written: say what it must leave alone
        con.print("input and output units must be in no group: a --spec that permutes them gets answers that "
                  "change the outputs, which verification refuses where a forward is known (a record, --model or "
                  "a bare chain) and cannot see otherwise")
    else:
        con.print("input and output units are never permuted")
    for w in (*network.warnings, *network.risks):
        con.print(f"traced: {w}")
    if network.assumption:
        warn(network.assumption)


def _structure(group: str, n: int, head, matrices: int) -> str:
    """What kind of group: attention heads (and with which groups they move), a residual stream, or ""
    for plain units."""
    parts = []
    if head is not None:
        _, hs = head
        others = [g for g in hs.groups if g != group]
        rigid = " (whole blocks)" if group in hs.rigid else ""
        parts.append(f"{hs.count} heads of {n // hs.count}{rigid}" + (f", moved with {', '.join(others)}" if others
                                                                      else ""))
    if matrices > 2:  # a plain hidden layer's units are in two weight matrices: its own and the next one's
        parts.append(f"shared by {matrices} weight matrices (a residual stream)")
    return "; ".join(parts)  # empty: plain hidden units, which "N units" says already
