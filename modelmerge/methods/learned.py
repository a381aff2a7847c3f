"""DEEP-ALIGN as a method: a learned aligner's one-pass answer (bundled default or ``--aligner``)."""

from __future__ import annotations

import time

from modelmerge.methods.base import Answer, Context, Method, register


def _load(ctx: Context):
    """``(model, card, why_not)``: the aligner for this pair, or why there is none (computed once)."""
    return ctx.once("aligner", lambda: _choose(ctx))


def _choose(ctx: Context):
    from modelmerge.deepalign.model import OutOfFamilyError
    from modelmerge.deepalign.pretrained import default_aligner, load_aligner

    net = ctx.network
    if net.chain is None:
        return None, None, "the learned aligner reads Linear/Conv chains, and this spec is not one"
    if ctx.aligner is not None:
        model, card = load_aligner(ctx.aligner)
    else:
        weights = default_aligner(net.family, net.depth)
        if weights is None:
            return None, None, f"no bundled aligner covers a {net.depth}-layer {net.family.upper()}"
        model, card = load_aligner(weights.name)
    ws = _weight_spaces(ctx)[0]
    try:
        model.check_supports(ws)
    except OutOfFamilyError as e:
        return None, None, str(e).split(";")[0]
    need, free = model.memory_needed(ws), available_memory()
    if free is not None and need > free // 2:  # half: the checkpoints and the outputs need the rest
        return None, None, (f"the learned aligner would need ~{need / 2**30:.1f} GiB for layers this wide, more than "
                            f"half of the {free / 2**30:.1f} GiB of memory available")
    return model, card, None


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation: Linux's MemAvailable (else free physical pages),
    and no more than a container's cgroup limit leaves; None where the system does not say."""
    found = _meminfo()
    limit = _cgroup_room()
    if limit is not None:
        found = limit if found is None else min(found, limit)
    return found


def _meminfo() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room(root: str = "/sys/fs/cgroup") -> int | None:
    """What a cgroup memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) leaves beside the usage,
    or None without a limit (MemAvailable ignores it, and a container is killed at it)."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            with open(f"{root}/{limit_file}") as f:
                text = f.read().strip()
            if text == "max" or int(text) >= 1 << 60:  # no limit (v1 writes a huge number)
                continue
            with open(f"{root}/{usage_file}") as f:
                used = int(f.read().strip())
            return max(int(text) - used, 0)
        except (OSError, ValueError):
            continue
    return None


def _weight_spaces(ctx: Context):
    """A's and B's weight spaces (built once) and the seconds that took."""
    def make():
        t = time.perf_counter()
        return ctx.network.weight_space(ctx.a), ctx.network.weight_space(ctx.b), time.perf_counter() - t

    return ctx.once("weight_spaces", make)


def _trained_inputs(card: dict) -> set[int]:
    """Input sizes (MLP: features; CNN: channels) of the networks an aligner was trained on, from its card
    (empty when the card does not say)."""
    sizes = set()
    for zoo in card.get("zoos") or []:
        arch = zoo.get("arch") if isinstance(zoo, dict) else None
        if not isinstance(arch, dict):
            continue
        first = (arch.get("widths") or [None])[0] if "widths" in arch else (arch.get("input_shape") or [None])[0]
        if isinstance(first, int):
            sizes.add(first)
    return sizes


def _unavailable(ctx: Context) -> str | None:
    return _load(ctx)[2]


def _run(ctx: Context, start: Answer | None) -> Answer:
    model, card, why = _load(ctx)
    if why is not None:
        from modelmerge.deepalign.model import OutOfFamilyError

        raise OutOfFamilyError(f"deep-align: {why}; pass another --aligner or use --method weight-matching")
    t = time.perf_counter()
    ws_a, ws_b, build_seconds = _weight_spaces(ctx)
    perms = model.align(ws_a, ws_b)
    chain = ctx.network.chain
    perm = {chain.group(layer): p for layer, p in enumerate(perms)}
    depths = tuple(model.config.depths)
    notes = () if ctx.network.depth in depths else (
        f"aligner {card.get('name')!r} was trained on {'/'.join(map(str, depths))}-layer networks, not "
        f"{ctx.network.depth}: its answer is untested at this depth (pass --data to rank it against weight matching)",)
    inputs, n_in = _trained_inputs(card), ws_a.widths[0]
    if inputs and n_in not in inputs:
        what = "input channels" if ws_a.family == "cnn" else "inputs"
        notes += ((f"aligner {card.get('name')!r} was trained on networks with {'/'.join(map(str, sorted(inputs)))} "
                   f"{what}, not {n_in}: at input sizes no training zoo had, its answers measured on par with weight "
                   "matching's, not better (docs/pretrained.md; pass --data to rank them against it)"),)
    # the learned stage is reading both networks (the weight spaces) plus the forward pass
    return Answer("deep-align", perm, "learned", build_seconds + time.perf_counter() - t, aligner=card.get("name"),
                  notes=notes)


register(Method("deep-align", "align", False, _run, _unavailable))  # one forward pass, data-free
