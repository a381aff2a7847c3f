"""``modelmerge demo``: the whole pipeline on the bundled example checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelmerge.cli._common import Force, Threads, console, handle_errors, load, save, set_threads

EXAMPLES = """
Examples:

  modelmerge demo

  modelmerge demo --output-dir ./demo-out --force
"""


@handle_errors
def demo_command(
    output_dir: Annotated[
        Path | None,
        typer.Option("--output-dir", help="Where to write the aligned and merged checkpoints (default: a new temp folder)."),
    ] = None,
    threads: Threads = None,
    force: Force = False,
) -> None:
    """Align two bundled digits MLPs, merge them, and compare the loss barrier before and after."""
    import tempfile
    import time

    from rich.table import Table

    from modelmerge.alignment import align
    from modelmerge.checkpoint import check_output_path, provenance
    from modelmerge.errors import OutputError
    from modelmerge.evaluate import interpolation_curve
    from modelmerge.examples import example_paths, example_test_data
    from modelmerge.merge import interpolate
    from modelmerge.network import resolve_network

    set_threads(threads)
    con = console()
    if output_dir is None:
        output_dir = Path(tempfile.mkdtemp(prefix="modelmerge-demo-"))
    else:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create {output_dir}: {e.strerror}; choose another --output-dir") from None
    pa, pb = example_paths()
    targets = [output_dir / "b_aligned.safetensors", output_dir / "merged.safetensors"]
    for path in targets:  # the user's files in --output-dir are not replaced without --force
        check_output_path(path, [pa, pb], force)
    a, b = load(pa), load(pb)
    con.print(f"[bold]modelmerge demo[/]: two digits MLPs {a.arch['widths']} trained from different seeds")
    network = resolve_network(a.state, record=a.arch)
    t0 = time.perf_counter()
    result = align(a.state, b.state, network=network, seed=0)  # auto: the bundled aligner if it covers the net
    seconds = time.perf_counter() - t0
    wm = result if result.method == "weight-matching" else align(a.state, b.state, network=network,
                                                                  method="weight-matching", seed=0)
    merged = interpolate(a.state, result.aligned, 0.5)
    meta = provenance(result.method, a, b, arch_of=a, own_of=(a, b))
    aligned_path = save(result.aligned, targets[0], meta, [pa, pb], force)
    merged_path = save(merged, targets[1], {**meta, "modelmerge.alpha": "0.5"}, [pa, pb], force)

    metric = network.metric(example_test_data(), "test")
    naive = interpolation_curve(a.state, b.state, metric, 11)
    aligned = interpolation_curve(a.state, result.aligned, metric, 11)
    rows = [("naive", naive, None)]
    if wm is not result:
        rows.append(("weight matching", interpolation_curve(a.state, wm.aligned, metric, 11), wm.seconds["align"]))
    rows.append((f"{result.method} (auto)", aligned, result.seconds["align"]))
    # what the bundled digits add: `align --data digits` refines the best answer on the training split
    # (the table's curves are on the test split, which the refinement never reads)
    refined = align(a.state, b.state, network=network, data="digits", seed=0)
    rows.append(("auto --data digits", interpolation_curve(a.state, refined.aligned, metric, 11),
                 refined.seconds["align"]))
    table = Table(title="A -> B on the digits test split; merged = alpha 0.5", title_justify="left")
    for col in ("", "loss barrier", "AUC", "merged loss", "merged acc", "align s"):
        table.add_column(col, justify="right" if col else "left", no_wrap=not col)
    for name, c, secs in rows:
        table.add_row(name, f"{c.barrier:.4f}", f"{c.auc:.4f}", f"{c.losses[5]:.4f}", f"{c.accuracies[5]:.3f}",
                      "-" if secs is None else f"{secs:.3f}")
    con.print(table)
    factor = naive.barrier / max(aligned.barrier, 1e-12)
    con.print(f"endpoints: A accuracy {naive.accuracies[0]:.3f}, B accuracy {naive.accuracies[-1]:.3f}")
    con.print(f"{result.method} cut the loss barrier {factor:.1f}x in {seconds:.2f} s, verification included "
              f"({result.verification.describe()})")
    for note in result.notes:
        con.print(f"note: {note}")
    con.print(f"wrote {aligned_path} and {merged_path}")
