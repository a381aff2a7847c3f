"""Alignment methods and refinements, each registered once (see :mod:`modelmerge.methods.base`).

Adding a method: write a module with a ``run(ctx, start) -> Answer`` function,
``register(Method(...))`` it, and import the module here.
"""

# registration order is the order of --method / --refine choices
from modelmerge.methods import weight_matching, learned, activation, lmc  # noqa: F401, I001
from modelmerge.methods.base import Answer, Context, Method, get, names, register

__all__ = ["Answer", "Context", "Method", "get", "names", "register"]
