"""Alignment methods and refinements, each registered once (see :mod:`modelmerge.methods.base`).

Adding a method: write a module with a ``run(ctx, start) -> Answer`` function,
``register(Method(...))`` it, and import the module here.
"""

from modelmerge.methods import learned, lmc, weight_matching  # noqa: F401  (registration)
from modelmerge.methods.base import Answer, Context, Method, get, names, register

__all__ = ["Answer", "Context", "Method", "get", "names", "register"]
