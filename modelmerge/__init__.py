"""modelmerge: align (re-basin) and merge neural-network checkpoints.

The public Python API is imported lazily so that ``modelmerge --help`` stays
fast (it must not import torch)::

    import modelmerge as mm
    a = mm.load_checkpoint("a.safetensors")
    b = mm.load_checkpoint("b.safetensors")
    result = mm.align(a.state, b.state, record=a.arch)   # or module=MyNet() holding A's weights
    merged = mm.interpolate(a.state, result.aligned, alpha=0.5)

    net = mm.resolve_network(a.state, record=a.arch)     # what runs it: spec, forward, data shape
    perm, info = mm.weight_matching(a.state, b.state, net.spec, seed=0)
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("modelmerge-align")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

_LAZY = {
    "Checkpoint": "modelmerge.checkpoint",
    "load_checkpoint": "modelmerge.checkpoint",
    "save_checkpoint": "modelmerge.checkpoint",
    "PermutationSpec": "modelmerge.spec",
    "HeadSet": "modelmerge.spec",
    "infer_spec": "modelmerge.spec",
    "infer_chain": "modelmerge.spec",
    "apply_permutation": "modelmerge.permutation",
    "invert_permutation": "modelmerge.permutation",
    "compose_permutations": "modelmerge.permutation",
    "random_permutation": "modelmerge.permutation",
    "identity_permutation": "modelmerge.permutation",
    "weight_matching": "modelmerge.matching",
    "interpolate": "modelmerge.merge",
    "merge_many": "modelmerge.soup",
    "align": "modelmerge.alignment",
    "Network": "modelmerge.network",
    "resolve_network": "modelmerge.network",
    "trace_spec": "modelmerge.trace",
    "load_aligner": "modelmerge.deepalign.pretrained",
    "list_aligners": "modelmerge.deepalign.pretrained",
    "ModelMergeError": "modelmerge.errors",
    "limit_threads": "modelmerge.threads",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'modelmerge' has no attribute {name!r}")
