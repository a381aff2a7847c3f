"""``modelmerge aligners``: the bundled pretrained aligners."""

from __future__ import annotations

from typing import Annotated

import typer

from modelmerge.cli._common import console, handle_errors, print_json

EXAMPLES = """
Examples:

  modelmerge aligners

  modelmerge aligners --json
"""


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
    table = Table()
    table.add_column("name", no_wrap=True)
    for col in ("family", "depths", "default"):
        table.add_column(col, no_wrap=True)
    table.add_column("hold-out barrier / WM's", no_wrap=True)
    for w in weights:
        table.add_row(w.name, w.family, _depths(w.depths), "yes" if w.default else "", _score(w.card))
    con = console()
    con.print(table if weights else "no aligners are bundled with this installation")


def _score(card: dict) -> str:
    """Learned-only barrier / weight matching's per benchmark family, else the training validation's."""
    families = card.get("holdout", {}).get("families", {})
    if families:
        return "\n".join(f"{name} {r['learned'] / r['weight_matching']:.2f}x" for name, r in families.items())
    val = card.get("validation", {})
    if val.get("barrier") is not None and val.get("weight_matching_barrier"):
        return f"{val['barrier'] / val['weight_matching_barrier']:.2f}x (validation)"
    return "-"


def _depths(depths) -> str:
    """``2-6`` for a run of consecutive depths, else ``3,5``: short enough not to be cut."""
    d = sorted(depths)
    if len(d) > 2 and d == list(range(d[0], d[-1] + 1)):
        return f"{d[0]}-{d[-1]}"
    return ",".join(map(str, d))
