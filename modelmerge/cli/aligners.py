"""``modelmerge aligners``: the bundled pretrained aligners."""

from __future__ import annotations

from typing import Annotated

import typer

from modelmerge.cli._common import console, handle_errors, print_json


@handle_errors
def aligners_command(
    json_out: Annotated[bool, typer.Option("--json", help="Print the cards as JSON.")] = False,
) -> None:
    """List the bundled pretrained aligners (family, depths, hold-out numbers)."""
    from rich.table import Table

    from modelmerge.deepalign.pretrained import list_aligners

    weights = list_aligners()
    if json_out:
        print_json([w.card for w in weights])
        return
    table = Table("name", "family", "depths", "default", "hold-out barrier (vs weight matching)", "parameters")
    for w in weights:
        val = w.card.get("holdout", w.card.get("validation", {}))
        score = "-"
        if val.get("barrier") is not None:
            score = f"{val['barrier']:.4f} ({val.get('weight_matching_barrier', float('nan')):.4f})"
        table.add_row(w.name, w.family, ",".join(map(str, w.depths)), "yes" if w.default else "",
                      score, f"{w.card.get('parameters', 0):,}")
    con = console()
    con.print(table if weights else "no aligners are bundled with this installation")
