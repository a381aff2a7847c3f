"""``modelmerge interpolate A B -o OUT --alpha 0.5``: per-tensor linear interpolation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelmerge.cli._common import Force, Revision, console, handle_errors


@handle_errors
def interpolate_command(
    a: Annotated[str, typer.Argument(help="Checkpoint A (alpha = 0).")],
    b: Annotated[str, typer.Argument(help="Checkpoint B, already aligned to A (alpha = 1).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the merge (.safetensors).")],
    alpha: Annotated[float, typer.Option("--alpha", help="Weight of B: (1-alpha)*A + alpha*B.")] = 0.5,
    revision: Revision = None,
    force: Force = False,
) -> None:
    """Write (1-alpha)*A + alpha*B per tensor (integer buffers are copied from A)."""
    from modelmerge.checkpoint import check_output_path, load_checkpoint, provenance, save_checkpoint
    from modelmerge.merge import interpolate

    check_output_path(output, [a, b], force)
    ck_a = load_checkpoint(a, revision)
    ck_b = load_checkpoint(b, revision)
    merged = interpolate(ck_a.state, ck_b.state, alpha)
    meta = provenance("interpolate", ck_a, ck_b, alpha=str(alpha))
    if ck_a.arch is not None:
        meta["modelmerge.arch"] = ck_a.metadata["modelmerge.arch"]
    save_checkpoint(merged, output, meta, [a, b], force)
    console().print(f"wrote {output}: (1-{alpha})*A + {alpha}*B over {len(merged)} tensors")
