"""Training a DEEP-ALIGN aligner on a zoo (optionally distributed with torch.distributed).

Pairs of *different* zoo networks are aligned by the model and scored by the
LMC loss on task data (and/or the L2 and planted auxiliaries). Networks are
split into train and validation sets *by network*; validation aligns fixed
pairs of held-out networks with the hard (Hungarian) answer and measures their
loss barrier, which picks the best checkpoint (the relative L2 distance does
when there is no data).

Output folder: ``aligner.safetensors`` (best weights), ``aligner.json`` (config
and card), ``last.pt`` (weights, optimiser, step: for ``--resume``; written on
every validation and on Ctrl-C).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from modelmerge.deepalign.losses import (
    augment,
    interpolate_stacked,
    l2_loss,
    lmc_loss,
    planted_loss,
    soft_permute,
    straight_through,
)
from modelmerge.deepalign.model import AlignerConfig, DeepAlign, hungarian, perm_matrix, widen
from modelmerge.errors import ModelMergeError
from modelmerge.matching import weight_matching
from modelmerge.spec import Chain, PermutationSpec, infer_chain
from modelmerge.stacked import stacked_forward
from modelmerge.weightspace import stacked_weight_space

ALIGNER_FILE = "aligner.safetensors"
CARD_FILE = "aligner.json"
LAST_FILE = "last.pt"
VAL_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


SCHEDULES = ("constant", "onecycle")


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of ``train-aligner`` (the paper used AdamW lr 5e-4; 2e-3 trained
    this small aligner faster in the same CPU time), weight decay 5e-4, clip 1.0.

    ``distill``: weight of the cross-entropy against refined answers for ``distill_pairs``
    training pairs per zoo (:mod:`modelmerge.deepalign.distill`; needs task data).
    ``schedule``: ``"constant"`` or ``"onecycle"`` (warm up to ``lr`` over the first 30 %
    of the steps, then cosine down to ``lr / 1e4``). ``val_every``: validate every so many
    steps (0: once per epoch). ``max_minutes``: stop after this much training time
    (0: no limit), validating once more before stopping. ``random_probes``: draw the probe
    inputs afresh at every training step (:attr:`DeepAlign.random_probes`).
    """

    epochs: int = 10
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 5e-4
    val_fraction: float = 0.1
    val_pairs: int = 16
    seed: int = 0
    lmc: float = 1.0
    l2: float = 0.0
    planted: float = 0.0
    data_batch: int = 128
    alpha_range: tuple[float, float] = (0.0, 1.0)
    sinkhorn_iters: int = 20
    clip: float = 1.0
    schedule: str = "constant"
    val_every: int = 0
    max_minutes: float = 0.0
    relative: bool = False
    distill: float = 0.0
    distill_pairs: int = 32
    random_probes: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ModelMergeError(f"unknown --schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")


@dataclass
class Zoo:
    """A zoo in memory: every network stacked, with its chain, spec and record."""

    folder: str
    record: dict
    chain: Chain
    spec: PermutationSpec
    states: dict[str, torch.Tensor]  # name -> [Nz, ...]
    seeds: list[int]
    dataset: str | None
    loss_scale: float = 1.0  # the networks' mean test loss (from the zoo's index), for relative losses

    @property
    def size(self) -> int:
        return len(self.seeds)

    def take(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[idx] for k, v in self.states.items()}


def check_zoo(folder: str | Path) -> dict:
    """A zoo's index, if training can use it (a readable ``zoo.json`` listing at least 4 networks).

    Raises:
        ModelMergeError: not a zoo, a corrupt index, or fewer than 4 networks.
    """
    from modelmerge.zoo.store import read_index

    index = read_index(folder)
    if len(index["models"]) < 4:
        raise ModelMergeError(f"zoo {folder} has {len(index['models'])} networks; training needs at least 4")
    return index


def load_zoo_for_training(folder: str | Path) -> Zoo:
    """Read a zoo made by ``modelmerge zoo`` and stack its networks.

    Raises:
        ModelMergeError: not a zoo, fewer than 4 networks, or networks of different architectures.
    """
    from modelmerge.zoo.store import load_zoo

    check_zoo(folder)
    index, checkpoints = load_zoo(folder)
    first = checkpoints[0].state
    for ck in checkpoints[1:]:
        if ck.state.keys() != first.keys() or any(ck.state[k].shape != first[k].shape for k in first):
            raise ModelMergeError(
                f"zoo {folder} mixes architectures ({checkpoints[0].source} vs {ck.source}); "
                "train one aligner per family on a zoo of one architecture"
            )
    chain = infer_chain(first)
    states = {k: torch.stack([ck.state[k] for ck in checkpoints]) for k in first}
    seeds = [m["seed"] for m in index["models"]]
    losses = [m["test_loss"] for m in index["models"] if isinstance(m.get("test_loss"), (int, float))]
    scale = float(np.mean(losses)) if losses and np.mean(losses) > 0 else 1.0
    return Zoo(str(folder), index["arch"], chain, chain.spec(first), states, seeds, index.get("dataset"), scale)


def align_stacked(model: DeepAlign, zoo: Zoo, a: Mapping, b: Mapping) -> list[torch.Tensor]:
    """Hard answers for stacked pairs: per hidden layer ``[N, n]``."""
    with torch.inference_mode():  # (see DeepAlign.align; the answers are built outside it)
        logits = model(stacked_weight_space(zoo.chain, a), stacked_weight_space(zoo.chain, b))
    return [torch.stack([hungarian(x) for x in s]) for s in logits]


def apply_hard(zoo: Zoo, b: Mapping, perms: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    mats = {zoo.chain.group(l): torch.stack([perm_matrix(p) for p in ps]) for l, ps in enumerate(perms)}
    return soft_permute(b, zoo.spec, mats)


def pair_barriers(record: Mapping, a: Mapping, b_aligned: Mapping, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Loss barrier of each pair over ``VAL_ALPHAS`` on ``(x, y)``: ``[N]`` (BatchNorm on batch statistics)."""
    n, k = next(iter(a.values())).shape[0], len(VAL_ALPHAS)
    rep = lambda s: {name: t.repeat_interleave(k, 0) for name, t in s.items()}
    alphas = torch.tensor(VAL_ALPHAS).repeat(n)
    with torch.no_grad():
        merged = interpolate_stacked(rep(a), rep(b_aligned), alphas)
        # BatchNorm on the evaluation batch's statistics, as the LMC loss does (see losses.lmc_loss)
        logits = stacked_forward(record, merged, x.expand(n * k, *x.shape), train=bool(record.get("batchnorm")))
        losses = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), y.repeat(n * k), reduction="none").view(n, k, -1).mean(2)
    al = torch.tensor(VAL_ALPHAS)
    line = (1 - al) * losses[:, :1] + al * losses[:, -1:]
    return (losses - line).amax(1)


@dataclass
class Validator:
    """Fixed held-out pairs and what weight matching reaches on them."""

    a: dict
    b: dict
    x: torch.Tensor | None
    y: torch.Tensor | None
    wm_barrier: float | None = None
    wm_l2: float | None = None

    def score(self, model: DeepAlign, zoo: Zoo) -> dict:
        aligned = apply_hard(zoo, self.b, align_stacked(model, zoo, self.a, self.b))
        out = {"l2": float(l2_loss(self.a, aligned))}
        if self.x is not None:
            out["barrier"] = float(pair_barriers(zoo.record, self.a, aligned, self.x, self.y).mean())
        return out


def _make_validator(zoo: Zoo, val_idx: list[int], pairs: int, data, seed: int) -> Validator:
    rng = np.random.default_rng(seed)
    pa, pb = [], []
    for _ in range(pairs):
        i, j = rng.choice(val_idx, 2, replace=False)
        pa.append(int(i))
        pb.append(int(j))
    a, b = zoo.take(torch.tensor(pa)), zoo.take(torch.tensor(pb))
    x = y = None
    if data is not None:
        x, y = data.x_test, data.y_test
    v = Validator(a, b, x, y)
    # the weight-matching reference on the same pairs
    wm_perms = [[] for _ in range(len(zoo.chain.layers) - 1)]
    for n in range(pairs):
        sa = {k: t[n] for k, t in a.items()}
        sb = {k: t[n] for k, t in b.items()}
        perm, _ = weight_matching(sa, sb, zoo.spec, seed=0)
        for l in range(len(wm_perms)):
            wm_perms[l].append(perm[zoo.chain.group(l)])
    aligned = apply_hard(zoo, b, [torch.stack(p) for p in wm_perms])
    v.wm_l2 = float(l2_loss(a, aligned))
    if x is not None:
        v.wm_barrier = float(pair_barriers(zoo.record, a, aligned, x, y).mean())
    return v


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def save_aligner(model: DeepAlign, folder: Path, card: Mapping) -> None:
    """Write ``aligner.safetensors`` and ``aligner.json`` atomically."""
    from modelmerge.checkpoint import save_checkpoint, write_json_atomic

    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    save_checkpoint(state, folder / ALIGNER_FILE, {"modelmerge.aligner": json.dumps(card)}, force=True)
    write_json_atomic(folder / CARD_FILE, card)


def _save_last(model: DeepAlign, opt, sched, step: int, epoch: int, best: float, folder: Path, seconds: float,
               source: dict) -> None:
    from modelmerge.checkpoint import atomic_path

    with atomic_path(folder / LAST_FILE) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "epoch": epoch,
                    "best": best, "scheduler": sched.state_dict() if sched is not None else None,
                    "seconds": seconds, "source": source}, tmp)


@dataclass
class _Part:
    """One zoo of a training run: its networks' split, data and validation pairs."""

    zoo: Zoo
    train_idx: list[int]
    val_idx: list[int]
    dataset: object | None
    validator: Validator | None = None
    targets: object | None = None  # distill.Targets: refined answers for some training pairs


def _prepare(zoo_dirs, data, settings, rank) -> list[_Part]:
    from modelmerge.archs import fit_inputs
    from modelmerge.data import load_dataset

    parts = []
    for i, folder in enumerate(zoo_dirs):
        zoo = load_zoo_for_training(folder)
        name = zoo.dataset if data == "zoo" else data
        if data == "zoo" and not name:
            raise ModelMergeError(f"zoo {folder} does not name its dataset; pass --data NAME")
        dataset = fit_inputs(zoo.record, load_dataset(name)) if name else None
        zoo.dataset = name
        order = np.random.default_rng([settings.seed, i]).permutation(zoo.size)
        n_val = max(2, int(round(zoo.size * settings.val_fraction)))
        val_idx, train_idx = order[:n_val].tolist(), order[n_val:].tolist()
        if len(train_idx) < 2:
            raise ModelMergeError(f"zoo {folder} is too small to split; use a larger zoo or a smaller --val-fraction")
        parts.append(_Part(zoo, train_idx, val_idx, dataset))
    families = {p.zoo.chain.family for p in parts}
    if len(families) > 1:
        raise ModelMergeError("the zoos mix MLP and CNN networks; train one aligner per family")
    per_zoo = max(1, settings.val_pairs // len(parts))
    if rank == 0:
        for i, p in enumerate(parts):
            p.validator = _make_validator(p.zoo, p.val_idx, per_zoo, p.dataset, settings.seed + i)
    return parts


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def train_aligner(
    zoo_dirs: str | Path | list,
    out_dir: str | Path,
    *,
    settings: TrainSettings = TrainSettings(),
    config: AlignerConfig | None = None,
    data: str | None = None,
    resume: bool = False,
    init: str | Path | None = None,
    add_layers: int = 0,
    widen_by: int = 1,
    on_step: Callable[[dict], None] | None = None,
    command: str = "",
) -> dict:
    """Train an aligner on one or more zoos of one family and write it to ``out_dir``.

    Args:
        zoo_dirs: folder(s) made by ``modelmerge zoo`` (different widths, depths and
            datasets may be mixed; MLPs and CNNs may not).
        out_dir: output folder (created).
        settings: optimisation settings and loss weights.
        config: aligner shape (family and depths are taken from the zoos).
        data: dataset for the LMC loss and validation barrier, ``"zoo"`` for each
            zoo's own dataset, or None to train with the L2 and planted terms only.
        resume: continue from ``out_dir/last.pt``.
        init: start from this aligner's weights and shape (a bundled name or a
            trained folder/file), e.g. to fine-tune a bundled aligner on new zoos.
        add_layers: with ``init``, append this many encoder layers that start close to
            the identity (the grown aligner first answers almost as ``init`` does), to
            add capacity without training from scratch.
        widen_by: with ``init``, multiply its encoder channels and readout width by this
            (:func:`~modelmerge.deepalign.model.widen`: copies, then 1 % noise), after ``add_layers``.
        on_step: progress callback receiving a dict (step, total, losses, validation).
        command: the command line, recorded in the card.

    Returns:
        The card written to ``aligner.json``.

    Raises:
        ModelMergeError: bad zoo, no loss left to train with, nothing to resume, or
            ``add_layers`` or ``widen_by`` without ``init``.
    """
    if add_layers < 0:
        raise ModelMergeError(f"--add-layers must be 0 or more, got {add_layers}")
    if add_layers and init is None:
        raise ModelMergeError("--add-layers grows the --init aligner; pass --init NAME (or train a deeper one with --layers)")
    if widen_by > 1 and init is None:
        raise ModelMergeError("--widen grows the --init aligner; pass --init NAME (or train a wider one with --channels)")
    rank, world = _dist_info()
    dirs = [zoo_dirs] if isinstance(zoo_dirs, (str, Path)) else list(zoo_dirs)
    parts = _prepare(dirs, data, settings, rank)
    lmc_w = settings.lmc if data is not None else 0.0
    if lmc_w == 0 and settings.l2 == 0 and settings.planted == 0:
        raise ModelMergeError("no loss to train with: pass --data for the LMC loss, or set --l2/--planted weights")
    model, init_name = _make_model(parts, config, init, settings.seed, add_layers, widen_by)
    model.random_probes = settings.random_probes
    run = _Run(model, parts, settings, Path(out_dir), data, lmc_w, command, init_name, rank, world)
    if resume:
        run.resume()
    run.make_folder()
    if settings.distill > 0 and lmc_w > 0:
        import sys

        from modelmerge.deepalign.distill import load_or_make

        model.eval()
        targets = load_or_make(Path(out_dir) / "distill.pt", parts, settings.distill_pairs, settings.seed,
                               model if init is not None else None,
                               lambda text: rank == 0 and print(text, file=sys.stderr, flush=True))
        model.train()
        for part, t in zip(parts, targets):
            part.targets = t
    run.fit(on_step)
    return run.finish(resume)


def _make_model(parts: list[_Part], config: AlignerConfig | None, init, seed: int, add_layers: int = 0,
                widen_by: int = 1) -> tuple[DeepAlign, str | None]:
    """A fresh aligner shaped for the zoos (family, depths), or ``init``'s weights and shape
    (plus ``add_layers`` near-identity encoder layers, then ``widen_by`` times the width)."""
    family = parts[0].zoo.chain.family
    start = start_card = None
    if init is not None:
        from modelmerge.deepalign.pretrained import load_aligner

        start, start_card = load_aligner(init)
        if start.config.family != family:
            raise ModelMergeError(f"--init {init} is a {start.config.family.upper()} aligner but the zoos hold "
                                  f"{family.upper()}s")
        # keep the starting aligner's shape; only switch on weighted costs if asked to
        wants = bool(config is not None and config.weighted_costs)
        edge_cost = config.edge_cost if config is not None and config.edge_cost else start.config.edge_cost
        if start.config.edge_cost and edge_cost != start.config.edge_cost:
            raise ModelMergeError(f"--init {init} has an edge-matching term of {start.config.edge_cost} channels; "
                                  f"drop --edge-cost {edge_cost}")
        config = AlignerConfig(**{**start.config.to_dict(), "weighted_costs": start.config.weighted_costs or wants,
                                  "layers": start.config.layers + add_layers, "edge_cost": edge_cost})
    base = config or AlignerConfig()
    if base.edge_cost and not base.unroll:
        raise ModelMergeError("--edge-cost adds a term to the unrolled iterations, and there are none (--unroll 0); "
                              "raise --unroll or drop --edge-cost")
    depths = tuple(sorted({len(p.zoo.chain.layers) for p in parts}))
    config = AlignerConfig(**{**base.to_dict(), "family": family, "depths": depths,
                              "conv_taps": tuple(base.conv_taps)})
    torch.manual_seed(seed)
    model = DeepAlign(config)
    if start is not None:
        missing, unexpected = model.load_state_dict(start.state_dict(), strict=False)
        new_parts = ("term_weights", "input_importance", "edge_proj", "unroll_edge",
                     *(f"layers.{i}." for i in range(start.config.layers, config.layers)))
        if unexpected or any(not k.startswith(new_parts) for k in missing):
            raise ModelMergeError(f"--init {init} does not fit the aligner being trained")
        with torch.no_grad():
            for layer in model.layers[start.config.layers:]:
                # a residual layer whose update is scaled by 0.01: close to the identity, so training starts
                # from init's answers, yet every weight of the layer gets a gradient (a zero scale would stall
                # them, and a zero update would sit on ReLU's kink)
                for mix in (layer.mix_e, layer.mix_v):
                    mix.norm.weight.fill_(0.01)
                    mix.norm.bias.zero_()
    if widen_by > 1:
        model = widen(model, widen_by, seed=seed)
    name = start_card.get("name") if start_card is not None else None
    if name is not None and add_layers:
        name = f"{name} + {add_layers} encoder layer{'s' if add_layers > 1 else ''}"
    if name is not None and widen_by > 1:
        name = f"{name}, widened {widen_by}x"
    return model, name


class _Run:
    """One training run: the model, its optimiser, the zoos, the step count and the best score so far."""

    def __init__(self, model: DeepAlign, parts: list[_Part], settings: TrainSettings, out: Path, data, lmc_w: float,
                 command: str, init_name: str | None, rank: int, world: int) -> None:
        self.t_start = time.perf_counter()
        self.model, self.parts, self.settings, self.out = model, parts, settings, out
        self.data, self.lmc_w, self.command, self.init_name = data, lmc_w, command, init_name
        self.rank, self.world = rank, world
        self.opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.trained = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=True)
        self.metric = ("barrier_ratio" if settings.relative else "barrier") if lmc_w > 0 else "l2"
        self.step = 0
        self.best = math.inf
        self.history: list = []
        self.resumed = False
        # what the saved best score was measured on: a resume must train and validate on the same
        named = data is None or not Path(data).is_file()  # a dataset name, or a file (compared by its path)
        self.source = {"zoos": [str(Path(p.zoo.folder).resolve()) for p in parts],
                       "data": (None if data is None else str(data)) if named else str(Path(data).resolve()),
                       "validation": [settings.val_fraction, settings.val_pairs, settings.seed, self.metric]}
        self.card: dict = {}
        n_train = sum(len(p.train_idx) for p in parts)
        self.steps_per_epoch = max(1, n_train // (settings.batch_size * world))
        self.total = self.steps_per_epoch * settings.epochs
        self.sched = None
        if settings.schedule == "onecycle":
            self.sched = torch.optim.lr_scheduler.OneCycleLR(
                self.opt, max_lr=settings.lr, total_steps=self.total, pct_start=0.3, div_factor=25.0,
                final_div_factor=400.0)
        self.weights = np.array([len(p.train_idx) for p in parts], dtype=float)
        self.weights /= self.weights.sum()

    def resume(self) -> None:
        last = self.out / LAST_FILE
        if not last.is_file():
            raise ModelMergeError(f"nothing to resume: {last} does not exist; drop --resume to start afresh")
        saved = torch.load(last, map_location="cpu", weights_only=True)
        old = saved.get("source")  # absent in checkpoints of earlier versions
        if old is not None and old != self.source:
            what = [w for w, k in (("--zoo", "zoos"), ("--data", "data"),
                                   ("--val-fraction/--val-pairs/--seed/--relative-loss", "validation"))
                    if old.get(k) != self.source.get(k)]
            raise ModelMergeError(f"{last} was written by a run with other {', '.join(what)}: its best score and "
                                  "history would not compare; resume with that run's options, or drop --resume")
        try:
            self.model.load_state_dict(saved["model"])
        except RuntimeError:
            raise ModelMergeError(f"{last} holds an aligner of another shape; resume with the shape options of the "
                                  "run that wrote it (--init, --add-layers, --widen, --edge-cost, --layers, --channels, ...)") from None
        self.opt.load_state_dict(saved["optimizer"])
        if self.sched is not None and saved.get("scheduler") is not None:
            self.sched.load_state_dict(saved["scheduler"])
        self.step, self.best = saved["step"], saved["best"]
        self.resumed = True
        if self.step >= self.total:
            raise ModelMergeError(f"{last} has already trained {self.step} steps of this run's {self.total}; "
                                  "raise --epochs to train more")
        # the card's seconds count the whole run: the time up to the saved step, then this part
        self.t_start -= saved.get("seconds", 0.0)

    def make_folder(self) -> None:
        if self.rank != 0:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            from modelmerge.errors import OutputError

            raise OutputError(f"cannot create aligner folder {self.out}: {e.strerror}; choose another -o") from None

    def write_card(self, final_val: dict) -> dict:
        """The card (config, zoos, settings, validation), updated with ``final_val``."""
        model, config, settings, parts = self.model, self.model.config, self.settings, self.parts
        self.card.update({
            "name": self.out.name, "family": config.family, "config": config.to_dict(),
            "supported_depths": list(config.depths), "parameters": model.num_parameters(),
            "zoos": [{"folder": str(p.zoo.folder), "size": p.zoo.size, "arch": p.zoo.record,
                      "dataset": p.zoo.dataset, "seeds": [min(p.zoo.seeds), max(p.zoo.seeds)],
                      "train_networks": len(p.train_idx), "val_networks": len(p.val_idx)} for p in parts],
            "data": self.data, "losses": {"lmc": self.lmc_w, "l2": settings.l2, "planted": settings.planted},
            "settings": {**asdict(settings), "alpha_range": list(settings.alpha_range)},
            "steps": self.step, "seconds": time.perf_counter() - self.t_start,
            "validation": {**final_val, "metric": self.metric,
                           "weight_matching_barrier": _mean([p.validator.wm_barrier for p in parts]),
                           "weight_matching_l2": _mean([p.validator.wm_l2 for p in parts]),
                           "pairs": sum(len(next(iter(p.validator.a.values()))) for p in parts)},
            "command": self.command, "init": self.init_name,
        })
        return self.card

    def validate_and_save(self, epoch: int) -> dict:
        """Score the held-out pairs; save the aligner if it is the best so far, and ``last.pt`` always."""
        self.model.eval()
        scores = [p.validator.score(self.model, p.zoo) for p in self.parts]
        self.model.train()
        val = {"l2": _mean([x["l2"] for x in scores])}
        if self.metric != "l2":
            val["barrier"] = _mean([x.get("barrier") for x in scores])
        if self.metric == "barrier_ratio":  # each zoo's barrier over weight matching's on its pairs
            val["barrier_ratio"] = _mean([x["barrier"] / max(p.validator.wm_barrier, 1e-6)
                                          for x, p in zip(scores, self.parts)])
        self.history.append({"step": self.step, **val})
        if val[self.metric] < self.best:
            self.best = val[self.metric]
            save_aligner(self.model, self.out, self.write_card({**val, "step": self.step}))
        _save_last(self.model, self.opt, self.sched, self.step, epoch, self.best, self.out,
                   time.perf_counter() - self.t_start, self.source)
        return val

    def fit(self, on_step: Callable[[dict], None] | None) -> None:
        """The steps, validating every ``val_every`` steps (else once per epoch) and at the end;
        on Ctrl-C, ``last.pt`` (and an aligner, if none was saved yet) is written first."""
        settings, rank = self.settings, self.rank
        rng = np.random.default_rng([settings.seed, rank, self.step])
        gen = torch.Generator().manual_seed(settings.seed * 1000 + rank + self.step)
        total, every = self.total, settings.val_every or self.steps_per_epoch
        deadline = time.perf_counter() + 60 * settings.max_minutes if settings.max_minutes else math.inf
        report = on_step if rank == 0 else None
        self.model.train()
        val: dict = {}
        try:
            while self.step < total:
                losses = self._one_step(rng, gen)
                if report is not None:
                    report({"step": self.step, "total": total,
                            **{k: float(v.detach()) for k, v in losses.items()}, **val})
                # every rank takes the same decision (same step count; the deadline is rank 0's)
                out_of_time = self._agree(time.perf_counter() > deadline)
                if self.step % every == 0 or self.step == total or out_of_time:
                    if rank == 0:
                        val = self.validate_and_save(self.step // self.steps_per_epoch)
                        if report is not None:
                            report({"step": self.step, "total": total, "validation": True, **val})
                    if self.world > 1:
                        torch.distributed.barrier()
                if out_of_time:
                    break
        except KeyboardInterrupt:
            if rank == 0:
                _save_last(self.model, self.opt, self.sched, self.step, self.step // self.steps_per_epoch,
                           self.best, self.out, time.perf_counter() - self.t_start, self.source)
                if not (self.out / ALIGNER_FILE).exists():
                    save_aligner(self.model, self.out, self.write_card({"interrupted": True}))
                self.finish(self.resumed)  # the card says how far the run got (steps_run), as at the end
            raise

    def _agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)])
        torch.distributed.broadcast(t, 0)
        return bool(t.item())

    def _one_step(self, rng, gen) -> dict:
        part = self.parts[rng.choice(len(self.parts), p=self.weights)]
        losses = _train_step(self.trained, part.zoo, part.train_idx, self.settings, part.dataset, self.lmc_w, rng,
                             gen, part.targets)
        self.opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.clip)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.step += 1
        return losses

    def finish(self, resumed: bool) -> dict:
        """The card on disk, with the validation history and the run's total seconds."""
        if self.rank != 0:
            return self.card
        from modelmerge.checkpoint import write_json_atomic

        card = json.loads((self.out / CARD_FILE).read_text())
        card["history"] = card.get("history", []) + self.history if resumed else self.history
        card["seconds"] = time.perf_counter() - self.t_start
        card["steps_run"] = self.step  # "steps" is the saved (best) checkpoint's step
        write_json_atomic(self.out / CARD_FILE, card)
        return card


def _train_step(trained, zoo: Zoo, train_idx, settings, dataset, lmc_w, rng, gen, refined=None) -> dict:
    """One optimisation step's losses (not yet backpropagated).

    With distillation targets, half the regular pairs are drawn from the refined
    pairs and their affinities also get the cross-entropy against the refined answers.

    Regular pairs (two different networks) and planted pairs (a network and an
    augmented, permuted copy) go through the aligner in *one* forward, as
    DistributedDataParallel expects.
    """
    from modelmerge.deepalign.model import sinkhorn

    n = settings.batch_size
    regular = lmc_w > 0 or settings.l2 > 0
    pairs = np.array([rng.choice(train_idx, 2, replace=False) for _ in range(n)])
    rows = None
    if refined is not None and settings.distill > 0:
        rows = torch.as_tensor(rng.choice(len(refined.pairs), n // 2))
        pairs[: n // 2] = refined.pairs[rows].numpy()
    a, b = zoo.take(torch.as_tensor(pairs[:, 0])), zoo.take(torch.as_tensor(pairs[:, 1]))
    batch_a, batch_b = ([a], [b]) if regular else ([], [])
    if settings.planted > 0:
        perms = [torch.stack([torch.randperm(zoo.spec.groups[zoo.chain.group(l)], generator=gen) for _ in range(n)])
                 for l in range(len(zoo.chain.layers) - 1)]
        batch_a.append(a)
        batch_b.append(apply_hard(zoo, augment(a, gen), perms))  # copy unit i = augmented A unit perm[i]
    cat = lambda parts: {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    logits = trained(stacked_weight_space(zoo.chain, cat(batch_a)), stacked_weight_space(zoo.chain, cat(batch_b)))
    losses: dict = {}
    total = torch.zeros(())
    if regular:
        reg = [s[:n] for s in logits]
        if lmc_w > 0:
            mats, _ = straight_through(reg, settings.sinkhorn_iters)
            aligned = soft_permute(b, zoo.spec, {zoo.chain.group(l): m for l, m in enumerate(mats)})
            idx = torch.randint(len(dataset.x_train), (n, settings.data_batch), generator=gen)
            lo, hi = settings.alpha_range
            alpha = lo + (hi - lo) * torch.rand(n, generator=gen)
            losses["lmc"] = lmc_loss(zoo.record, a, aligned, dataset.x_train[idx], dataset.y_train[idx], alpha)
            total = total + lmc_w * losses["lmc"] / (zoo.loss_scale if settings.relative else 1.0)
        if rows is not None and len(rows):
            losses["distill"] = planted_loss([s[: len(rows)] for s in reg], [t[rows] for t in refined.perms])
            total = total + settings.distill * losses["distill"]
        if settings.l2 > 0:
            soft = {zoo.chain.group(l): sinkhorn(s, settings.sinkhorn_iters) for l, s in enumerate(reg)}
            losses["l2"] = l2_loss(a, soft_permute(b, zoo.spec, soft))
            total = total + settings.l2 * losses["l2"]
    if settings.planted > 0:
        targets = [torch.argsort(p, dim=1) for p in perms]  # A unit i is copy unit argsort(perm)[i]
        losses["planted"] = planted_loss([s[-n:] for s in logits], targets)
        total = total + settings.planted * losses["planted"]
    losses["loss"] = total
    return losses
