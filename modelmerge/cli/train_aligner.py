"""``modelmerge train-aligner --zoo ./zoo -o ./my-aligner``: train a DEEP-ALIGN aligner on a zoo."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from modelmerge.cli._common import (
    Threads,
    TrainSeed,
    console,
    handle_errors,
    progress_bar,
    set_threads,
)

EXAMPLES = """
Examples:

  modelmerge train-aligner --zoo ./zoo -o ./my-aligner --data digits --epochs 20

  modelmerge train-aligner --zoo ./digits-zoo --zoo ./mnist1d-zoo --data zoo -o ./mlp-aligner

  torchrun --nproc-per-node 2 -m modelmerge train-aligner --zoo ./zoo -o ./my-aligner --data digits
"""


#: train-aligner options that set the aligner's shape, as AlignerConfig fields (--init fixes them;
#: --weighted-costs is not one: it may switch that feature on over --init)
SHAPE_OPTIONS = {"channels": "--channels", "layers": "--layers", "probes": "--probes", "unroll": "--unroll",
                 "feature_dim": "--feature-dim", "readout_hidden": "--readout-hidden", "output_dims": "--output-dims"}


@handle_errors
def train_aligner_command(
    ctx: typer.Context,
    zoo: Annotated[
        list[Path], typer.Option("--zoo", help="Zoo folder made by `modelmerge zoo` (repeat for several zoos "
                                 "of one family: widths, depths and datasets may differ).")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder for the aligner.")],
    data: Annotated[
        str | None, typer.Option("--data", help="Dataset for the LMC loss: digits | mnist1d | teacher | FILE, or 'zoo' "
                                 "for each zoo's own dataset (recommended).")
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Network pairs per step.")] = 8,
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 2e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0)] = 5e-4,
    val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.0, max=0.9, help="Share of each zoo's "
                            "networks held out for validation (at least 2 networks).")] = 0.1,
    val_pairs: Annotated[int, typer.Option("--val-pairs", min=1, help="Held-out pairs for validation, drawn from "
                         "the held-out networks (with repeats when they form fewer).")] = 16,
    l2: Annotated[float, typer.Option("--l2", min=0.0, help="Weight of the L2 auxiliary loss (without --data, "
                                      "--l2 and --planted both 0 train with --l2 1).")] = 0.0,
    planted: Annotated[float, typer.Option("--planted", min=0.0, help="Weight of the planted-permutation loss.")] = 0.0,
    alpha_min: Annotated[float, typer.Option("--alpha-min", min=0.0, max=1.0)] = 0.0,
    alpha_max: Annotated[float, typer.Option("--alpha-max", min=0.0, max=1.0)] = 1.0,
    channels: Annotated[int, typer.Option("--channels", min=1, help="Encoder width.")] = 8,
    layers: Annotated[int, typer.Option("--layers", min=0, help="Encoder layers.")] = 2,
    probes: Annotated[int, typer.Option("--probes", min=0, help="Probe inputs (0: none).")] = 64,
    unroll: Annotated[int, typer.Option("--unroll", min=0, help="Unrolled soft-matching iterations.")] = 3,
    feature_dim: Annotated[int, typer.Option("--feature-dim", min=1, help="Size of each unit's matching feature.")
                           ] = 32,
    readout_hidden: Annotated[
        int, typer.Option("--readout-hidden", min=0, help="Width of the v2 readout MLP, which also reads probe "
                          "responses and output-side features (0: the v1 readout).")
    ] = 0,
    output_dims: Annotated[
        int, typer.Option("--output-dims", min=0, help="Output-side features per unit and their correlation "
                          "term (0: off, as in v1).")
    ] = 0,
    schedule: Annotated[str, typer.Option("--schedule", help="Learning rate: constant | onecycle.")] = "constant",
    val_every: Annotated[int, typer.Option("--val-every", min=0, help="Validate every N steps (0: per epoch).")
                         ] = 0,
    relative: Annotated[
        bool, typer.Option("--relative-loss", help="Divide each zoo's LMC loss by its networks' mean test loss and "
                           "keep the checkpoint with the lowest mean validation barrier relative to weight matching.")
    ] = False,
    max_minutes: Annotated[
        float, typer.Option("--max-minutes", min=0.0, help="Stop after this much training (0: no limit); "
                            "the best validated aligner is kept.")
    ] = 0.0,
    weighted_costs: Annotated[
        bool, typer.Option("--weighted-costs", help="Learn per-term weights and input-unit importance in the "
                           "unrolled iterations (works with --init).")
    ] = False,
    edge_cost: Annotated[
        int, typer.Option("--edge-cost", min=0, help="Channels of a learned edge-matching term in the unrolled "
                          "iterations (0: off; works with --init, starting switched off).")
    ] = 0,
    random_probes: Annotated[
        bool, typer.Option("--random-probes", help="Draw the probe inputs afresh at every training step (answers "
                           "keep the fixed draw), so the aligner cannot fit one draw, which is indexed by input "
                           "position (measured: a trade of some accuracy on the zoos' data for some on other data).")
    ] = False,
    distill: Annotated[
        float, typer.Option("--distill", min=0.0, help="Weight of the cross-entropy against refined answers (the LMC "
                            "refinement with the zoo's data, from the best of weight matching and --init) for "
                            "--distill-pairs training pairs per zoo, computed before training (needs --data).")
    ] = 0.0,
    distill_pairs: Annotated[int, typer.Option("--distill-pairs", min=1, help="Refined pairs per zoo for --distill.")
                             ] = 32,
    seed: TrainSeed = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT/last.pt.")] = False,
    init: Annotated[
        str | None, typer.Option("--init", help="Start from an aligner's weights and shape (bundled name or "
                                 "trained folder/file), e.g. to fine-tune a bundled one.")
    ] = None,
    add_layers: Annotated[
        int, typer.Option("--add-layers", min=0, help="With --init: append this many encoder layers, starting close "
                          "to the identity, to give a trained aligner more capacity.")
    ] = 0,
    widen: Annotated[
        int, typer.Option("--widen", min=1, help="With --init: multiply its encoder channels and readout width by "
                          "this (copies of each channel, then 1% noise: starts from init's answers).")
    ] = 1,
    force: Annotated[bool, typer.Option("--force", help="Train into a folder that already holds an aligner.")] = False,
    threads: Threads = None,
) -> None:
    """Train a learned aligner on a zoo: LMC loss with --data, else the L2/planted losses."""
    import torch

    from modelmerge.deepalign.model import AlignerConfig
    from modelmerge.deepalign.train import ALIGNER_FILE, TrainSettings, train_aligner
    from modelmerge.errors import ModelMergeError, OutputError, check_seed

    check_seed(seed)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if alpha_min > alpha_max:
        raise ModelMergeError("--alpha-min must not exceed --alpha-max")
    if edge_cost and unroll == 0 and init is None:  # (with --init, its unroll counts: checked when it is read)
        raise ModelMergeError("--edge-cost adds a term to the unrolled iterations, and there are none (--unroll 0); "
                              "raise --unroll or drop --edge-cost")
    if distill > 0 and data is None:
        raise ModelMergeError("--distill refines pairs with task data: pass --data (e.g. --data zoo)")
    if output.exists() and not output.is_dir():
        raise OutputError(f"-o {output} is a file; train-aligner writes a folder (aligner.safetensors, aligner.json)")
    if (output / ALIGNER_FILE).exists() and not (resume or force):
        raise OutputError(f"{output} already holds an aligner; pass --resume to continue it or --force to retrain")
    from modelmerge.checkpoint import resolved

    for folder in zoo:
        if resolved(folder) == resolved(output):
            raise OutputError(f"-o {output} is a --zoo folder (an input); write the aligner to another folder")
    from modelmerge.deepalign.train import check_zoo

    for folder in zoo:  # validate the zoos (and --init) before any advice is printed
        check_zoo(folder)
    if init is not None:
        from modelmerge.deepalign.pretrained import load_aligner

        start = load_aligner(init)[0].config
        # by name: typer may bring its own copy of click, whose ParameterSource is another class
        given = {f: ctx.params[f] for f in SHAPE_OPTIONS
                 if getattr(ctx.get_parameter_source(f), "name", None) == "COMMANDLINE"}
        differ = [f"{SHAPE_OPTIONS[f]} {v} (it has {getattr(start, f)})" for f, v in given.items()
                  if v != getattr(start, f)]
        source = getattr(ctx.get_parameter_source("edge_cost"), "name", None)
        if source == "COMMANDLINE" and start.edge_cost and edge_cost != start.edge_cost:
            differ.append(f"--edge-cost {edge_cost} (it has {start.edge_cost})")  # 0 cannot switch it off
        if differ:  # the shape comes from --init: a different value would be ignored
            raise ModelMergeError(f"--init {init} sets the aligner's shape, so {', '.join(differ)} cannot apply; drop "
                                  "them (grow it with --add-layers or --widen instead)")
    set_threads(threads, default=1)
    if world > 1:
        import torch.distributed as dist

        # training runs on the CPU: gloo for CPU tensors, plus nccl for CUDA ones where CUDA exists
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    con = console()
    l2_w, planted_w = l2, planted
    notes = []  # printed once training starts, so that an error stays the only line
    if data is None and l2_w == 0 and planted_w == 0:
        l2_w = 1.0
        if rank == 0:
            notes.append("note: no --data, so no LMC loss; training with the L2 loss (pass --data for much better "
                         "aligners)")
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                             val_fraction=val_fraction, val_pairs=val_pairs, seed=seed, l2=l2_w, planted=planted_w,
                             alpha_range=(alpha_min, alpha_max), schedule=schedule, val_every=val_every,
                             max_minutes=max_minutes, relative=relative, distill=distill,
                             distill_pairs=distill_pairs, random_probes=random_probes)
    config = AlignerConfig(channels=channels, layers=layers, probes=probes, unroll=unroll, feature_dim=feature_dim,
                           weighted_costs=weighted_costs, readout_hidden=readout_hidden, output_dims=output_dims,
                           edge_cost=edge_cost)
    command = "modelmerge " + " ".join(sys.argv[1:])
    import time

    started = time.time()
    try:
        with progress_bar("training aligner") as bar:
            def on_step(info: dict) -> None:
                while notes:
                    con.print(notes.pop(0))
                text = " ".join(f"{k} {info[k]:.4f}" for k in ("lmc", "l2", "planted", "distill") if k in info)
                if "barrier" in info:
                    text += f" | val barrier {info['barrier']:.4f}"
                elif "validation" in info and "l2" in info:
                    text += f" | val l2 {info['l2']:.4f}"
                bar(info["step"], info["total"], text)

            card = train_aligner(zoo, output, settings=settings, config=config, data=data,
                                 resume=resume, init=init, add_layers=add_layers, widen_by=widen,
                                 on_step=on_step if rank == 0 else None, command=command)
    except KeyboardInterrupt:
        if rank == 0:
            from modelmerge.deepalign.train import LAST_FILE

            last = output / LAST_FILE
            if last.is_file() and (resume or last.stat().st_mtime >= started):
                said = f"the last checkpoint is in {output} (resume with --resume)"
            else:  # stopped while preparing (zoos, baselines, distillation targets): nothing of this run saved
                said = "stopped before the first training step, so there is nothing to resume; run the command again"
            sys.stderr.write(f"modelmerge: interrupted; {said}\n")
        raise typer.Exit(130) from None
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if rank == 0:
        val = card["validation"]
        line = f"wrote {output}/aligner.safetensors ({card['parameters']:,} parameters, {card['steps']} step{'s' * (card['steps'] != 1)}, " \
               f"{card['seconds']:.0f} s); best validation "
        if val.get("barrier") is not None:
            line += f"barrier {val['barrier']:.4f} (weight matching {val['weight_matching_barrier']:.4f})"
            if val.get("barrier_ratio") is not None:
                line += f", mean ratio to weight matching {val['barrier_ratio']:.3f}"
        else:
            line += f"L2 {val['l2']:.4f} (weight matching {val['weight_matching_l2']:.4f})"
        con.print(line)
