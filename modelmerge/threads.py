"""One place that controls every CPU thread pool a command uses.

Torch has its own intra-op pool; NumPy and SciPy each bundle an OpenBLAS with
its own pool (weight matching's cost matrices are NumPy products). Limiting
only torch leaves the BLAS pools at one thread per core, and on a busy machine
those threads spin against torch's and the neighbours' (weight matching on a
64-128-128-128-10 MLP pair: 0.034 s idle, 1.17 s beside a busy process, 0.046 s
with one BLAS thread). So both are set here, the BLAS/OpenMP pools through
``threadpoolctl`` (environment variables would come too late: the libraries
read them when they load).

* :func:`set_threads` — what each command calls once: the ``--threads``
  option, else ``MODELMERGE_THREADS``, else the command's default.
* :func:`limit_threads` — a context manager for library users that restores the
  previous limits on exit::

      import modelmerge as mm
      with mm.limit_threads(1):
          result = mm.align(a, b, record=record)

``threadpoolctl`` sees only libraries already loaded, so both first load
NumPy's and SciPy's BLAS and torch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

ENV = "MODELMERGE_THREADS"
#: more threads than any machine has: larger counts overflow torch's setter (a traceback, not an error)
MAX_THREADS = 4096


def resolve_threads(threads: int | None = None, default: int | None = 1) -> int:
    """The thread count a command uses.

    Args:
        threads: the explicit option (``--threads``); wins when given.
        default: the command's default when neither the option nor ``MODELMERGE_THREADS``
            (a positive integer) is set; ``None`` means all cores.

    Returns:
        The number of threads, at least 1.

    Raises:
        ModelMergeError: ``threads`` is given, or ``MODELMERGE_THREADS`` is set, and is not a positive integer.
    """
    if threads is None:
        env = os.environ.get(ENV, "").strip()
        if env and not (env.isascii() and env.isdigit() and 0 < int(env) <= MAX_THREADS):  # a typo would
            # otherwise pass for the default ("³".isdigit() holds, but int() refuses it)
            from modelmerge.errors import ModelMergeError

            raise ModelMergeError(f"{ENV}={env!r} is not a thread count from 1 to {MAX_THREADS}; set it to one "
                                  "(e.g. 1) or unset it")
        threads = int(env) if env else (default or os.cpu_count() or 1)
    _check(threads)
    return threads


def set_threads(threads: int | None = None, default: int | None = 1) -> int:
    """Limit torch's intra-op threads and the BLAS/OpenMP pools under NumPy and SciPy, for good.

    Commands call this once, before any work (the count follows :func:`resolve_threads`).

    Args:
        threads: the explicit option; else ``MODELMERGE_THREADS``; else ``default``.
        default: the command's default: 1 for alignment, ``None`` (all cores) for zoo training.

    Returns:
        The number of threads set.
    """
    from threadpoolctl import threadpool_limits

    n = resolve_threads(threads, default)
    torch = _load_pools()
    torch.set_num_threads(n)
    threadpool_limits(limits=n)  # applied now; the returned limiter is not restored
    return n


@contextlib.contextmanager
def limit_threads(n: int = 1) -> Iterator[int]:
    """Use ``n`` threads in torch and in the BLAS/OpenMP pools inside a ``with`` block.

    On exit (also on an exception) torch's previous thread count and every
    pool's previous limit are restored.

    Args:
        n: threads for torch and for each BLAS/OpenMP pool (default 1: the
            alignment default, which a busy neighbour cannot slow down).

    Returns:
        A context manager; ``with limit_threads(1) as n`` binds the count set.

    Raises:
        ModelMergeError: ``n`` is not a positive integer.
    """
    from threadpoolctl import threadpool_limits

    _check(n)
    torch = _load_pools()
    before = torch.get_num_threads()
    try:
        with threadpool_limits(limits=n):
            torch.set_num_threads(n)
            yield n
    finally:
        torch.set_num_threads(before)


def _check(n) -> None:
    from modelmerge.errors import ModelMergeError

    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_THREADS:
        raise ModelMergeError(f"the thread count must be an integer from 1 to {MAX_THREADS}, got {n!r}")


def _load_pools():
    """Load NumPy's and SciPy's BLAS and torch so that threadpoolctl can see them; return torch."""
    import numpy  # noqa: F401
    import scipy.linalg  # noqa: F401  (loads SciPy's own OpenBLAS)
    import torch

    return torch
