"""Weight matching (Git Re-Basin) as a method, and as a refinement of another answer."""

from __future__ import annotations

import time

from modelmerge.matching import weight_matching
from modelmerge.methods.base import Answer, Context, Method, register


def _run(ctx: Context, start: Answer | None) -> Answer:
    t = time.perf_counter()
    # (visits done, estimated total) after each group visit; Context may carry it (read if present)
    on_progress = getattr(ctx, "on_progress", None)
    perm, info = weight_matching(ctx.a, ctx.b, ctx.network.spec, seed=ctx.seed, max_iter=ctx.max_iter,
                                 init=start.perm if start is not None else None, on_progress=on_progress)
    seconds = time.perf_counter() - t
    if start is None:
        return Answer("weight-matching", perm, "weight_matching", seconds, info.iterations, info.converged,
                      objective=(info.objective_before, info.objective_after))
    return Answer(f"{start.name}+wm", perm, "refine", seconds, info.iterations, info.converged, start.aligner)


register(Method("weight-matching", "align", False, _run))  # Git Re-Basin: coordinate descent over groups
register(Method("wm", "refine", False, _run))  # the same, started from the answer being refined
