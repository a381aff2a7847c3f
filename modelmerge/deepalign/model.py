"""DEEP-ALIGN: a permutation-equivariant network that reads two networks and aligns them.

``F = project ∘ affinity ∘ (readout, probes) ∘ encoder``:

* **encoder** (shared by A and B): layers over the canonical weight space
  (:mod:`modelmerge.weightspace`). Each layer holds edge features
  ``E_l [N, n_l, n_{l-1}, C]`` and node features ``V_l [N, n_l, C]`` and mixes
  every block with its row, column and global *means* and with the nodes at
  both ends of its edges (a DWS/NP-style equivariant layer). Means, not sums,
  and per-layer weight normalisation keep it indifferent to widths; shared
  weights with role embeddings (first / middle / last layer, input / hidden /
  output nodes) let one aligner serve any depth. No parameter's shape depends
  on a width or on the input or output size.
* **probes**: fixed Gaussian inputs (drawn for whatever input size the
  network has) with a learned scale and offset per input unit or channel, read
  from both networks' input-node features; each hidden unit's standardised
  pre-activations on them are its probe response (a learned, data-free form of
  activation matching).
* **output side** (``output_dims > 0``, v2): per hidden unit of layer ``m`` its
  column of the product of the downstream weights ``W_L ... W_{m+1}`` (each
  layer RMS-normalised, kernel taps summed): how the unit feeds the fixed
  outputs, ignoring the nonlinearities. Outputs are not permuted, so these
  columns are comparable across A and B as they are.
* **readout**: per hidden unit, ``[V_l, mean of incoming edges, mean of outgoing
  edges] -> MLP -> L2-normalised feature``; in v2 (``readout_hidden > 0``) the
  MLP also reads the unit's probe responses (averaged over positions for
  convs) and its output-side column projected by a fixed seeded Gaussian
  matrix to ``output_dims`` numbers (any output size), plus its log-norm.
* **affinity**: per hidden layer, a learned mix of the features' cosine
  ``F_A F_B^T``, the probe responses' correlation (rows: A's units) and, in v2,
  the output-side columns' correlation, then
  ``unroll`` soft weight-matching iterations that add each layer's
  cross-network cost given its neighbours' soft permutations.
* **projection**: log-domain Sinkhorn while training, the Hungarian algorithm
  at inference.

Symmetries (tested): permuting A's hidden units by g and B's by g' turns the
answer k into g k g'^T; swapping A and B transposes it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from modelmerge.errors import ModelMergeError
from modelmerge.forward import spatial_shape
from modelmerge.weightspace import WeightSpace

ROLES_EDGE = ("first", "middle", "last", "only")
ROLES_NODE = ("input", "hidden", "output")
KINDS = ("linear", "conv", "flatten")


class OutOfFamilyError(ModelMergeError):
    """A network the aligner was not built for (wrong family or depth)."""


@dataclass(frozen=True)
class AlignerConfig:
    """Hyper-parameters of a DEEP-ALIGN network (saved with its weights).

    Attributes:
        family: ``"mlp"`` (Linear chains) or ``"cnn"`` (Conv chains with a linear head).
        channels: width of the encoder's edge and node features.
        layers: number of equivariant encoder layers.
        feature_dim: size of each hidden unit's matching feature.
        probes: number of probe inputs (0 turns probes off). Probes are fixed
            Gaussian inputs (seeded, any input size) with a learned scale and
            offset per input unit (MLP) or input channel (CNN) and probe,
            computed from both networks' input-node features.
        probe_size: side of the CNN probe images (a conv net's input size is not in its weights).
        depths: numbers of layers (Linear/Conv) the aligner was trained on; the
            network itself accepts any depth >= 2, `auto` only trusts these.
        conv_taps: kernel tap counts with a dedicated embedding (9 = 3x3, 3 = 3-tap 1-d).
        unroll: soft weight-matching iterations after the first affinity (0: none).
        weighted_costs: learn, in the unrolled iterations, separate weights for the
            incoming, outgoing and bias terms and a per-input-unit importance for the
            first layer (read from both networks' input-node features).
        readout_hidden: width of the v2 readout MLP, which also reads each unit's
            probe responses and output-side features (0: the v1 readout).
        output_dims: size of the projected output-side feature per unit, and
            switch for the output-side correlation term (0: off, as in v1).
        edge_cost: channels of the learned edge-matching term of the unrolled iterations
            (0: off): weight matching's cost computed on the encoder's edge features,
            projected to this many channels, instead of on the raw weights.
    """

    family: str = "mlp"
    channels: int = 8
    layers: int = 2
    feature_dim: int = 32
    probes: int = 64
    probe_size: int = 8
    depths: tuple[int, ...] = (4,)
    conv_taps: tuple[int, ...] = (9, 3)
    unroll: int = 3
    weighted_costs: bool = False
    readout_hidden: int = 0
    output_dims: int = 0
    edge_cost: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["depths"], d["conv_taps"] = list(self.depths), list(self.conv_taps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AlignerConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for key in ("depths", "conv_taps"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def sinkhorn(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Log-domain Sinkhorn: a doubly-stochastic matrix from ``[..., n, n]`` logits."""
    for _ in range(iters):
        logits = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        logits = logits - torch.logsumexp(logits, dim=-2, keepdim=True)
    return logits.exp()


#: the probe draw every answer uses (one for all input sizes; fresh draws only in training with random_probes)
PROBE_SEED = 1234


def hungarian(scores: torch.Tensor) -> torch.Tensor:
    """Hard assignment maximising ``scores [n, n]``: ``perm[i]`` = column matched to row ``i``.

    Raises:
        ModelMergeError: the scores are not finite (weights so large that the aligner's float32 overflows).
    """
    if not torch.isfinite(scores).all():
        raise ModelMergeError("the learned aligner's affinities are not finite: the weights are too large for its "
                              "float32 arithmetic; rescale the checkpoints, or use --method weight-matching")
    rows, cols = linear_sum_assignment(scores.detach().to(torch.float64).cpu().numpy(), maximize=True)
    out = np.empty_like(cols)
    out[rows] = cols
    return torch.as_tensor(out, dtype=torch.long)


def perm_matrix(perm: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``P[i, perm[i]] = 1``: aligned = P @ original along that axis."""
    n = perm.numel()
    m = torch.zeros(n, n, dtype=dtype)
    m[torch.arange(n), perm] = 1.0
    return m


def _standardise(c: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit std per matrix (``[N, n, n]``): makes cost terms comparable, equivariantly."""
    sd, mean = torch.std_mean(c, (1, 2), correction=0, keepdim=True)  # one operation for the two reductions
    return (c - mean) / (sd + 1e-8)


def _centred(cols: torch.Tensor) -> torch.Tensor:
    """Rows centred and L2-normalised over the last axis: their dot products are correlations."""
    cols = cols - cols.mean(-1, keepdim=True)
    return cols / (cols.norm(dim=-1, keepdim=True) + 1e-8)


def _scaling_sinkhorn(logits: torch.Tensor, iters: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sinkhorn in scaling form: one ``exp``, then vector-matrix products (several times
    faster than the log domain; used inside the unrolled iterations). ``mask`` (0/1, the
    shape of ``logits``) marks padding: its entries weigh nothing and come out 0."""
    # (N, n, n), max entry 1; entries below e^-30 of the row's best are floored there so
    # that the scalings stay finite in float32
    shifted = logits - logits.amax(2, keepdim=True)
    k = torch.exp(shifted.clamp_min(-30.0))
    if mask is not None:
        # padded rows and columns get scalings of 1e30 (their sums are 0, clamped to 1e-30), but
        # every product of one with k is an exact 0, so the real block's sums and scalings are the unpadded ones
        k = k * mask
    kt = k.transpose(1, 2)
    # scalings as row vectors (N, 1, n): row-vector x matrix products measured ~3.5x faster
    # here than matrix x column-vector ones at n = 128 (same sums)
    v = torch.ones_like(k[:, :1, :])
    for _ in range(iters):  # (reciprocal: `1.0 / t` is two operations, a reciprocal and a product by 1)
        u = torch.reciprocal(torch.bmm(v, kt).clamp_min(1e-30))  # u_i = 1 / sum_j k_ij v_j
        v = torch.reciprocal(torch.bmm(u, k).clamp_min(1e-30))  # v_j = 1 / sum_i u_i k_ij
    return u.transpose(1, 2) * k * v


def _sym_sinkhorn(logits: torch.Tensor, iters: int = 10, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sinkhorn made exactly transpose-symmetric: ``P(X^T) = P(X)^T`` (row-first and column-first averaged)."""
    n = logits.shape[0]
    if mask is not None:
        mask = torch.cat([mask, mask.transpose(1, 2)])
    both = _scaling_sinkhorn(torch.cat([logits, logits.transpose(1, 2)]), iters, mask)  # one batch: half the ops
    return 0.5 * (both[:n] + both[n:].transpose(1, 2))


#: at inference, when no hidden layer is wider than this, layers of different widths share one
#: padded Sinkhorn batch: below it the iterations are bound by the number of operations, not by
#: their size (one wider layer sends all back to batches by width)
_PAD_WIDTH = 128


def _padded_sinkhorn(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`_sym_sinkhorn` of layers of several widths in one batch, padded to the widest (the padding's
    logits are the dtype's lowest value and its kernel entries are masked to exact zeros)."""
    rows, cols = max(s.shape[1] for s in logits), max(s.shape[2] for s in logits)
    low = torch.finfo(logits[0].dtype).min
    batch = torch.cat([F.pad(s, (0, cols - s.shape[2], 0, rows - s.shape[1]), value=low) for s in logits])
    mask = torch.cat([F.pad(torch.ones_like(s), (0, cols - s.shape[2], 0, rows - s.shape[1])) for s in logits])
    both = _sym_sinkhorn(batch, mask=mask)
    return [part[:, :s.shape[1], :s.shape[2]] for part, s in zip(both.split([s.shape[0] for s in logits]), logits)]


def _sinkhorn_layers(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`_sym_sinkhorn` of every layer, layers of one width in one batch (same values,
    a third of the small operations for a 3-hidden-layer MLP of one width); at inference,
    layers of different widths too, padded, when none is wider than ``_PAD_WIDTH``."""
    shapes = {tuple(s.shape[1:]) for s in logits}
    # (float16 is left out: its padded scalings would overflow to inf, and inf * 0 is NaN)
    if (len(shapes) > 1 and not torch.is_grad_enabled() and max(max(sh) for sh in shapes) <= _PAD_WIDTH
            and logits[0].dtype in (torch.float32, torch.float64)):
        return _padded_sinkhorn(logits)
    out: list[torch.Tensor | None] = [None] * len(logits)
    by_shape: dict[tuple, list[int]] = {}
    for i, s in enumerate(logits):
        by_shape.setdefault(tuple(s.shape[1:]), []).append(i)
    for idx in by_shape.values():
        if len(idx) == 1:
            out[idx[0]] = _sym_sinkhorn(logits[idx[0]])
            continue
        both = _sym_sinkhorn(torch.cat([logits[i] for i in idx]))
        for i, part in zip(idx, both.split([logits[i].shape[0] for i in idx])):
            out[i] = part
    return out


class _CrossCosts:
    """Weight-matching cost of every hidden layer given its neighbours' soft permutations.

    For hidden layer l: ``W_A,in · P_{l-1} · W_B,in^T + W_A,out^T · P_{l+1} · W_B,out + b_A b_B^T``
    (summed over kernel taps), standardised. Inputs and outputs are fixed (identity).
    With ``weights`` (incoming, outgoing, bias) each term is standardised and weighted;
    ``importance [N, n_0]`` weights the first layer's input units.

    Built once per forward: the terms that no soft permutation enters (the first layer's
    incoming term, the last hidden layer's outgoing term, the biases) are computed once,
    and the weights are laid out for batched matrix products, so each unrolled iteration
    runs two products per term (a three-operand einsum took ~27 small operations; the
    unrolled costs were a fifth of the CNN aligner's operations).
    """

    def __init__(self, a: WeightSpace, b: WeightSpace, importance: torch.Tensor | None = None) -> None:
        wa, wb = a.weights, b.weights  # (N, n_{l+1}, n_l, T)
        self.n_hidden = len(wa) - 1
        n = wa[0].shape[0]
        self.const_in, self.const_out, self.bias = {}, {}, []
        self.a_in, self.b_in, self.b_out, self.a_out = {}, {}, {}, {}
        for l in range(1, len(wa)):
            self.bias.append(a.biases[l - 1][:, :, None] * b.biases[l - 1][:, None, :])
            w_in_a, w_in_b = wa[l - 1], wb[l - 1]
            n_l, n_prev, taps = w_in_a.shape[1:]
            if l == 1:
                if importance is not None:
                    self.const_in[l] = torch.einsum("nikt,nk,njkt->nij", w_in_a, importance, w_in_b)
                else:
                    self.const_in[l] = torch.einsum("nikt,njkt->nij", w_in_a, w_in_b)
            else:  # sum_{k,q,t} A[i,k,t] P[k,q] B[j,q,t] = ((A as [(i,t), k]) P as [i, (t,q)]) (B as [j, (t,q)])^T
                self.a_in[l] = w_in_a.transpose(2, 3).reshape(n, n_l * taps, n_prev)
                self.b_in[l] = w_in_b.transpose(2, 3).reshape(n, n_l, taps * n_prev).transpose(1, 2)
            w_out_a, w_out_b = wa[l], wb[l]
            n_next, taps = w_out_a.shape[1], w_out_a.shape[3]  # (a flattening layer: positions, not taps)
            if l == len(wa) - 1:
                self.const_out[l] = torch.einsum("nkit,nkjt->nij", w_out_a, w_out_b)
            else:  # sum_{k,q,t} A[k,i,t] P[k,q] B[q,j,t] = (A as [i, (k,t)]) (P (B as [q, (j,t)]) as [(k,t), j])
                self.a_out[l] = w_out_a.transpose(1, 2).reshape(n, n_l, n_next * taps)
                self.b_out[l] = w_out_b.reshape(n, n_next, n_l * taps)

    def __call__(self, soft: list[torch.Tensor], weights=None) -> list[torch.Tensor]:
        """Per hidden layer the standardised cost ``[N, n_l (A), n_l (B)]`` given ``soft[l - 1]``
        (the hidden layers' soft permutations, ``[N, n_l, n_l]``)."""
        out = []
        for l in range(1, self.n_hidden + 1):
            if l in self.const_in:
                c_in = self.const_in[l]
            else:
                ap = torch.bmm(self.a_in[l], soft[l - 2])  # (N, n_l * T, n_{l-1})
                c_in = torch.bmm(ap.view(ap.shape[0], self.b_in[l].shape[2], -1), self.b_in[l])
            if l in self.const_out:
                c_out = self.const_out[l]
            else:
                pb = torch.bmm(soft[l], self.b_out[l])  # (N, n_{l+1}, n_l * T)
                n, n_next = pb.shape[:2]
                n_l = self.a_out[l].shape[1]
                if pb.shape[2] != n_l:  # kernel taps: [k, (j, t)] -> [(k, t), j]
                    pb = pb.view(n, n_next, n_l, -1).permute(0, 1, 3, 2).reshape(n, -1, n_l)
                c_out = torch.bmm(self.a_out[l], pb)
            if weights is None:
                out.append(_standardise(c_in + c_out + self.bias[l - 1]))
            else:
                out.append(_standardise(weights[0] * _standardise(c_in) + weights[1] * _standardise(c_out)
                                        + weights[2] * _standardise(self.bias[l - 1])))
        return out


#: the edge term's weight is this times its parameter: it starts at 0 and must reach the size of the
#: other terms' weights (~3) within a fine-tune's few hundred Adam steps of ~lr each (measured: without
#: the gain it crept to 0.02 in 200 steps at lr 5e-4)
_EDGE_GAIN = 10.0


def _edge_costs(ea: list[torch.Tensor], eb: list[torch.Tensor], soft: list[torch.Tensor]) -> list[torch.Tensor]:
    """:class:`_CrossCosts` on learned edge codes ``ea[l], eb[l] [N, n_{l+1}, n_l, D]`` instead of weights.

    For hidden layer l: ``sum_d (X_A,d · P_{l-1} · X_B,d^T + Y_A,d^T · P_{l+1} · Y_B,d)``, standardised;
    the codes are the encoder's edge features (which see each edge's row, column and layer), so this
    is weight matching's objective with a learned notion of which edges agree. Symmetric in A and B
    (``P`` transposes with them).
    """
    n_layers = len(ea)
    out = []
    for l in range(1, n_layers):
        xa, xb = ea[l - 1], eb[l - 1]  # (N, n_l, n_{l-1}, D)
        if l > 1:
            xa = torch.einsum("nikd,nkq->niqd", xa, soft[l - 2])
        c_in = torch.einsum("nikd,njkd->nij", xa, xb)
        ya, yb = ea[l], eb[l]  # (N, n_{l+1}, n_l, D)
        if l < n_layers - 1:
            ya = torch.einsum("nkid,nkq->nqid", ya, soft[l])
        c_out = torch.einsum("nqid,nqjd->nij", ya, yb)
        out.append(_standardise(c_in + c_out))
    return out


#: rows (entries of an edge or node tensor) from which the matrix-product forms below pay off;
#: below it (nodes, conv kernels) the plain calls are faster
_MATRIX_FORM_ROWS = 4096


def _centring(c: int, dtype: torch.dtype) -> torch.Tensor:
    """``I - 1/c``: right-multiplying by it subtracts the mean over the last axis (size ``c``)."""
    return torch.eye(c, dtype=dtype).sub_(1.0 / c)


def _adaptive_mean(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """``adaptive_avg_pool{1,2}d(x [B, C, *s], size)`` as one product with the pooling matrix
    (the same windows and weights; ~4x faster here on CPU than the pooling kernel at 8x8 -> 2x2)."""
    spatial = x.shape[2:]
    mat = None
    for n_in, n_out in zip(spatial, size):  # per axis: window i covers [floor(i n/o), ceil((i+1) n/o))
        axis = x.new_zeros(n_in, n_out)
        for i in range(n_out):
            lo, hi = (i * n_in) // n_out, -(-(i + 1) * n_in // n_out)
            axis[lo:hi, i] = 1.0 / (hi - lo)
        mat = axis if mat is None else torch.kron(mat, axis)  # row-major flattening of both grids
    return (x.reshape(-1, mat.shape[0]) @ mat).reshape(*x.shape[:2], *size)


class _Mix(nn.Module):
    """Per-entry LayerNorm + ReLU after an update, with a residual connection."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, old: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        # LayerNorm over the channels written as two small matrix products (centring, then the
        # mean square): the same values as nn.LayerNorm to float rounding, ~1.7x faster on the
        # edge tensors (N, n, n, C) with C = 8-32 on CPU, where it was a fifth of the aligner's time
        c = update.shape[-1]
        flat = update.reshape(-1, c)
        if flat.shape[0] < _MATRIX_FORM_ROWS:  # one call beats four here
            return old + F.relu(self.norm(update), inplace=True)
        centred = flat @ _centring(c, flat.dtype)
        inv = torch.rsqrt(centred.square() @ torch.full((c, 1), 1.0 / c, dtype=flat.dtype) + self.norm.eps)
        out = torch.addcmul(self.norm.bias, centred * inv, self.norm.weight)
        return old + F.relu(out, inplace=True).view(update.shape)


class EquivariantLayer(nn.Module):
    """One weight-space layer, equivariant to every hidden-unit permutation.

    Shapes: edges ``E[l]: [N, n_{l+1}, n_l, C]``, nodes ``V[l]: [N, n_l, C]``
    for ``l = 0..L`` (``V[0]`` inputs, ``V[L]`` outputs).
    """

    def __init__(self, c: int) -> None:
        super().__init__()
        names = ("e", "row", "col", "all", "v_out", "v_in", "v", "inc", "outg", "vmean")
        self.lin = nn.ModuleDict({n: nn.Linear(c, c, bias=n in ("e", "v")) for n in names})
        self.mix_e = _Mix(c)
        self.mix_v = _Mix(c)

    def _edge_update(self, e: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """``mix_e(e, lin_e(e) + row + col)`` for one edge tensor ``e [N, n_out, n_in, C]``
        (``row [N, n_out, C]``, ``col [N, n_in, C]``)."""
        lin, norm = self.lin["e"], self.mix_e.norm
        c = e.shape[-1]
        if torch.is_grad_enabled() or e.numel() < _MATRIX_FORM_ROWS * c:
            upd = lin(e).add_(row[:, :, None, :]).add_(col[:, None, :, :])
            return self.mix_e(e, upd)
        # inference on a large tensor: the LayerNorm's centring is linear, so it is folded into
        # lin_e's matrix and the row/column terms, and the rest runs in place: the same values
        # to float rounding with 8 operations over the whole tensor instead of 10 (autograd
        # would need the intermediates, so training keeps the form above)
        centring = _centring(c, e.dtype)
        x = (e.reshape(-1, c) @ (lin.weight.t() @ centring)).view(e.shape)
        x.add_(((row + lin.bias) @ centring)[:, :, None, :]).add_((col @ centring)[:, None, :, :])
        inv = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(c).add_(norm.eps).rsqrt_()
        torch.addcmul(norm.bias, x.mul_(inv), norm.weight, out=x)
        return x.relu_().add_(e)

    def forward(self, E: list[torch.Tensor], V: list[torch.Tensor]) -> tuple[list, list]:
        lin = self.lin
        rows = [e.mean(2) for e in E]  # (N, n_out, C): per unit, over its incoming edges
        cols = [e.mean(1) for e in E]  # (N, n_in, C): per unit, over its outgoing edges
        new_e = []
        for l, e in enumerate(E):
            # the small per-row and per-column terms first, then broadcast adds: the edge
            # tensors (N, n, n, C) are the memory traffic that bounds this layer
            row = lin["row"](rows[l]) + lin["v_out"](V[l + 1]) + lin["all"](rows[l].mean(1))[:, None, :]
            col = lin["col"](cols[l]) + lin["v_in"](V[l])
            new_e.append(self._edge_update(e, row, col))
        new_v = []
        for l, v in enumerate(V):
            upd = lin["v"](v) + lin["vmean"](v.mean(1))[:, None, :]
            if l > 0:
                upd = upd + lin["inc"](rows[l - 1])
            if l < len(E):
                upd = upd + lin["outg"](cols[l])
            new_v.append(self.mix_v(v, upd))
        return new_e, new_v


class DeepAlign(nn.Module):
    """The learned aligner. See the module docstring; ``config`` fixes its shape."""

    def __init__(self, config: AlignerConfig = AlignerConfig()) -> None:
        super().__init__()
        self.config = config
        # in training mode, a fresh probe draw per forward (set by train-aligner --random-probes): the learned
        # probe scales and offsets then cannot fit one draw, which an input size no zoo had changes
        self.random_probes = False
        c = config.channels
        self.tap_stats = nn.Linear(4, c)
        self.tap_conv = nn.ModuleDict({str(t): nn.Linear(t, c, bias=False) for t in config.conv_taps})
        self.edge_role = nn.Embedding(len(ROLES_EDGE), c)
        self.edge_kind = nn.Embedding(len(KINDS), c)
        self.node_role = nn.Embedding(len(ROLES_NODE), c)
        self.bias_in = nn.Linear(1, c)
        self.layers = nn.ModuleList(EquivariantLayer(c) for _ in range(config.layers))
        k = config.probes
        self.probe = nn.Linear(c, 2 * k) if k else None
        if self.probe is not None:  # start as plain Gaussian probes: scale 1, offset 0
            nn.init.zeros_(self.probe.weight)
            nn.init.zeros_(self.probe.bias)
        if config.readout_hidden:
            h = config.readout_hidden
            n_in = 3 * c + k + config.output_dims + 1
            self.readout = nn.Sequential(nn.Linear(n_in, h), nn.ReLU(), nn.Linear(h, h // 2), nn.ReLU(),
                                         nn.Linear(h // 2, config.feature_dim))
        else:
            self.readout = nn.Sequential(nn.Linear(3 * c, 2 * config.feature_dim), nn.ReLU(),
                                         nn.Linear(2 * config.feature_dim, config.feature_dim))
        self.output_scale = nn.Parameter(torch.tensor(0.0)) if config.output_dims else None
        # affinity = exp(probe_scale) * probe correlation + exp(log_scale) * feature cosine
        self.log_scale = nn.Parameter(torch.tensor(0.0))
        self.probe_scale = nn.Parameter(torch.tensor(math.log(3.0))) if k else None
        # unrolled matching: per iteration, Sinkhorn inverse temperature, weight of the
        # previous affinity and of the new cross-network weight cost
        t = config.unroll
        self.unroll_temp = nn.Parameter(torch.full((t,), math.log(10.0)))
        self.unroll_keep = nn.Parameter(torch.full((t,), 0.5))
        self.unroll_cost = nn.Parameter(torch.full((t,), 3.0))
        if config.edge_cost:
            # starts switched off (weight 0), so an aligner grown with it starts from its own answers
            self.edge_proj = nn.Linear(c, config.edge_cost, bias=False)
            self.unroll_edge = nn.Parameter(torch.zeros(t))
        if config.weighted_costs:
            self.term_weights = nn.Parameter(torch.ones(t, 3))  # incoming, outgoing, bias per iteration
            self.input_importance = nn.Linear(c, 1)  # starts at softplus(0.5413) = 1 for every input
            nn.init.zeros_(self.input_importance.weight)
            nn.init.constant_(self.input_importance.bias, math.log(math.e - 1))

    # ------------------------------------------------------------------ checks
    def memory_needed(self, ws: WeightSpace) -> int:
        """Bytes :meth:`align` holds at its peak for a pair of ``ws``'s shape, estimated: its edge
        features (``[2, n_{l+1}, n_l, channels]`` per layer) dominate, a few of them alive at once
        (measured: ~270 bytes per weight-matrix entry at 16 channels, in float32, for MLPs of
        widths 512-2048)."""
        edges = sum(w.shape[1] * w.shape[2] for w in ws.weights)
        return int(edges * self.config.channels * 20) + (64 << 20)

    def check_supports(self, ws: WeightSpace) -> None:
        """Raise OutOfFamilyError unless this aligner can read ``ws``."""
        fam = self.config.family
        if ws.family != fam:
            raise OutOfFamilyError(
                f"this aligner reads {fam.upper()} chains, but the network is a {ws.family.upper()}; "
                "use --method weight-matching or an aligner of that family"
            )
        if len(ws.weights) < 2:
            raise OutOfFamilyError("the network has no hidden layer, so there is nothing to align")
        for w, kind in zip(ws.weights, ws.kinds):
            if kind == "conv" and str(w.shape[-1]) not in self.tap_conv:
                raise OutOfFamilyError(
                    f"this aligner knows conv kernels with {', '.join(map(str, self.config.conv_taps))} taps, "
                    f"not {w.shape[-1]}; use --method weight-matching"
                )

    # ----------------------------------------------------------------- encoder
    def _embed(self, ws: WeightSpace):
        weights, biases, kinds = ws.weights, ws.biases, ws.kinds
        L = len(weights)
        E, V = [], []
        for l, (w, kind) in enumerate(zip(weights, kinds)):
            # per network and layer, scale-free: weights and biases divided by the weights' RMS
            rms = w.pow(2).mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12).sqrt()  # (N,1,1,1)
            w = w / rms
            role = "only" if L == 1 else "first" if l == 0 else "last" if l == L - 1 else "middle"
            shift = self.edge_role.weight[ROLES_EDGE.index(role)] + self.edge_kind.weight[KINDS.index(kind)]
            if w.shape[-1] == 1:
                # one tap: the statistics (mean, RMS, max, min) are (w, |w|, w, w), so the linear map
                # of them is two broadcast products (same values, half the time of stack + linear)
                k = self.tap_stats.weight  # (C, 4)
                e = torch.addcmul(self.tap_stats.bias + shift, w, k[:, 0] + k[:, 2] + k[:, 3])
                e = e.addcmul_(w.abs(), k[:, 1])  # (N, n_out, n_in, C)
            else:
                stats = torch.stack([w.mean(-1), w.pow(2).mean(-1).sqrt(), w.amax(-1), w.amin(-1)], -1)
                e = self.tap_stats(stats) + shift  # (N, n_out, n_in, C)
                if kind == "conv":
                    e = e + self.tap_conv[str(w.shape[-1])](w)
            E.append(e)
            V.append(self.bias_in((biases[l] / rms[:, :, 0, 0])[..., None]))  # node l+1 from its bias
        n_in = weights[0].shape[2]
        v0 = torch.zeros(weights[0].shape[0], n_in, self.config.channels, dtype=weights[0].dtype)
        V = [v0] + V
        for l, v in enumerate(V):
            role = "input" if l == 0 else "output" if l == L else "hidden"
            V[l] = v + self.node_role.weight[ROLES_NODE.index(role)]
        return E, V

    def encode(self, ws: WeightSpace):
        """Encoder features: edges ``E[l] [N, n_{l+1}, n_l, C]`` and nodes ``V[l] [N, n_l, C]``."""
        E, V = self._embed(ws)
        for layer in self.layers:
            E, V = layer(E, V)
        return E, V

    def _probes(self, enc_a, enc_b, a: WeightSpace) -> torch.Tensor:
        """Probe inputs shared by A and B: ``[N, K, n_0]`` (MLP) or ``[N, K, C_in, *s]`` (CNN).

        Fixed Gaussian inputs (seeded; drawn for whatever input size the network
        has, so no parameter depends on it) times a learned scale plus a learned
        offset per input unit and probe, read from ``V_0(A) + V_0(B)`` (the same
        for A and B, and symmetric in them).
        """
        cfg = self.config
        w0 = a.weights[0]  # (N, n_1, n_0, T)
        n, n_in, k = w0.shape[0], w0.shape[2], cfg.probes
        conv = a.kinds[0] == "conv"
        spatial = ((cfg.probe_size,) * (2 if w0.shape[-1] == 9 else 1)) if conv else ()
        seed = PROBE_SEED
        if self.training and self.random_probes:
            seed = int(torch.randint(0, 2**31 - 1, ()))
        g = torch.Generator().manual_seed(seed)
        base = torch.randn((k, n_in, *spatial), generator=g, dtype=w0.dtype)
        mod = self.probe(enc_a[1][0] + enc_b[1][0])  # (N, n_0, 2K)
        scale = 1.0 + mod[..., :k].transpose(1, 2)  # (N, K, n_0)
        shift = mod[..., k:].transpose(1, 2)
        extra = (1,) * len(spatial)
        return base * scale.reshape(n, k, n_in, *extra) + shift.reshape(n, k, n_in, *extra)

    @staticmethod
    def probe_responses(ws: WeightSpace, x: torch.Tensor) -> list[torch.Tensor]:
        """Standardised pre-activations of every hidden unit on probes ``x``: ``[N, n_l, samples]``.

        The generic forward of the chain (layer, ReLU; convolutions keep the size;
        adaptive pooling feeds the linear head), run for N networks at once.
        For a conv layer every probe position is a sample.
        """
        n = x.shape[0]
        out = []
        weights = ws.weights
        for l, (w, b, kind) in enumerate(zip(weights, ws.biases, ws.kinds)):
            if kind == "conv":
                k_probes, c_in, spatial = x.shape[1], x.shape[2], x.shape[3:]
                kernel = (3, 3) if w.shape[-1] == 9 and len(spatial) == 2 else (w.shape[-1],) * len(spatial)
                conv = F.conv2d if len(spatial) == 2 else F.conv1d
                h = x.transpose(0, 1).reshape(k_probes, n * c_in, *spatial)  # models as channel groups
                z = conv(h, w.reshape(n * w.shape[1], c_in, *kernel), b.reshape(-1), padding="same", groups=n)
                z = z.reshape(k_probes, n, w.shape[1], *spatial).transpose(0, 1)  # (N, K, out, *s)
                samples = z.transpose(1, 2).reshape(n, w.shape[1], -1)  # (N, out, K*prod(s))
            else:
                if kind == "flatten":
                    s_len = w.shape[-1]
                    pooled = _adaptive_mean(x.flatten(0, 1), spatial_shape(s_len, x.ndim - 3))
                    x = pooled.reshape(n, x.shape[1], -1)  # (N, K, C*s), channel-major
                z = torch.baddbmm(b[:, None, :], x, w.reshape(n, w.shape[1], -1).transpose(1, 2))  # (N, K, out)
                samples = z.transpose(1, 2)
            if l == len(weights) - 1:
                break
            zs = samples - samples.mean(-1, keepdim=True)
            std = torch.linalg.vector_norm(zs, dim=-1, keepdim=True) / math.sqrt(zs.shape[-1])
            out.append(zs / (std + 1e-6))
            # the responses above are copies, so at inference z itself can take the ReLU
            x = F.relu(z) if torch.is_grad_enabled() else z.relu_()
        return out

    def features(self, a: WeightSpace, b: WeightSpace) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor]:
        """Matching features of every hidden layer of A and B: :meth:`_features` without the edge codes."""
        return self._features(a, b)[:2]

    def _features(self, a: WeightSpace, b: WeightSpace):
        """Matching features of every hidden layer of A and B.

        Args:
            a, b: ``N`` stacked networks each (``N`` pairs), of one signature.

        Returns:
            ``(per_layer, v0)``: per hidden layer ``(F_A, F_B, Z_A, Z_B, O_A, O_B)``,
            the L2-normalised encoder features ``[N, n_l, D]``, standardised probe
            responses ``[N, n_l, samples]`` (None without probes) and centred,
            normalised output-side columns ``[N, n_l, n_out]`` (None without
            ``output_dims``); the input nodes' features of A and B summed, ``[N, n_0, C]``;
            and with ``edge_cost`` the edge codes of A and B, per layer ``[N, n_{l+1}, n_l, edge_cost]``
            (else None).
        """
        # A and B go through the encoder and the probes as one batch of 2N networks:
        # the same answer per network, half the (overhead-bound) operations
        n = a.n
        both = a.cat(b)
        E, V = self.encode(both)
        enc_a = ([e[:n] for e in E], [v[:n] for v in V])
        enc_b = ([e[n:] for e in E], [v[n:] for v in V])
        z = None
        if self.config.probes:
            x = self._probes(enc_a, enc_b, a)
            z = self.probe_responses(both, torch.cat([x, x]))
        cfg = self.config
        cols = self.output_side(both) if cfg.output_dims else None
        proj = None
        if cols is not None and cfg.readout_hidden:
            g = torch.Generator().manual_seed(4321)  # fixed for any output size, like the probes
            proj = torch.randn(cols[0].shape[-1], cfg.output_dims, generator=g, dtype=cols[0].dtype)
            proj = proj / math.sqrt(cols[0].shape[-1])
        feats = []
        for l in range(1, len(a.weights)):
            parts = [V[l], E[l - 1].mean(2), E[l].mean(1)]
            if cfg.readout_hidden:
                if z is not None:  # per probe, averaged over positions (convs): K numbers per unit
                    parts.append(z[l - 1].reshape(2 * n, z[l - 1].shape[1], cfg.probes, -1).mean(-1))
                if cols is not None:
                    norm = cols[l - 1].norm(dim=-1, keepdim=True)
                    parts.append((cols[l - 1] / (norm + 1e-8)) @ proj)
                    parts.append(torch.log(norm / norm.mean(1, keepdim=True).clamp_min(1e-12) + 1e-6))
                else:
                    parts.append(V[l].new_zeros(*V[l].shape[:2], 1))
            f = F.normalize(self.readout(torch.cat(parts, -1)), dim=-1)
            zl = (None, None) if z is None else (z[l - 1][:n], z[l - 1][n:])
            ol = (None, None) if cols is None else _centred(cols[l - 1]).split(n)
            feats.append((f[:n], f[n:], *zl, *ol))
        codes = None
        if cfg.edge_cost:
            codes = [self.edge_proj(e) for e in E]
            codes = ([c[:n] for c in codes], [c[n:] for c in codes])
        return feats, V[0][:n] + V[0][n:], codes

    @staticmethod
    def output_side(ws: WeightSpace) -> list[torch.Tensor]:
        """How each hidden unit feeds the outputs, nonlinearities ignored: per hidden layer
        ``m = 1..L-1`` the columns of ``W_L ... W_{m+1}`` as ``[N, n_m, n_out]``.

        Every factor is RMS-normalised per network (and the running product
        too), so only directions and relative sizes count; kernel taps and the
        positions a flattening layer reads are summed.
        """
        mats = []
        for w in ws.weights:
            m = w.sum(-1)  # (N, n_{l+1}, n_l)
            mats.append(m / m.pow(2).mean((1, 2), keepdim=True).clamp_min(1e-12).sqrt())
        out = []
        d = mats[-1]
        for l in range(len(mats) - 1, 0, -1):
            out.append(d.transpose(1, 2))
            d = d @ mats[l - 1]
            d = d / d.pow(2).mean((1, 2), keepdim=True).clamp_min(1e-12).sqrt()
        return out[::-1]

    def forward(self, a: WeightSpace, b: WeightSpace) -> list[torch.Tensor]:
        """Affinity logits per hidden layer: ``[N, n_l (A), n_l (B)]``.

        First from the features (encoder cosine + probe correlation), then
        refined by ``config.unroll`` soft weight-matching iterations: each
        turns the current affinities into soft permutations and adds the
        standardised cross-network cost of every hidden layer given its
        neighbours' soft permutations (the weight-matching objective's
        per-layer term), with learned temperatures and mixing weights; with
        ``edge_cost``, also the same cost on learned edge codes.
        """
        scores = []
        feats, v0, codes = self._features(a, b)
        weights = importance = None
        if self.config.weighted_costs:
            importance = F.softplus(self.input_importance(v0))[..., 0]  # (N, n_0), symmetric in A and B
        for fa, fb, za, zb, oa, ob in feats:
            s = self.log_scale.exp() * _standardise(torch.bmm(fa, fb.transpose(1, 2)))
            if za is not None:  # correlation of probe responses (activation matching on probes)
                s = s + self.probe_scale.exp() * _standardise(torch.bmm(za, zb.transpose(1, 2)))
            if oa is not None:  # correlation of how the units feed the (shared) outputs
                s = s + self.output_scale.exp() * _standardise(torch.bmm(oa, ob.transpose(1, 2)))
            scores.append(s)
        cross = _CrossCosts(a, b, importance) if self.config.unroll else None
        # with one hidden layer its neighbours are the fixed inputs and outputs: no soft permutation
        # enters any cost, so the Sinkhorns are skipped (the same scores, ~a tenth of a 2-layer MLP's forward)
        needs_soft = len(a.weights) > 2
        for t in range(self.config.unroll):
            soft = _sinkhorn_layers([s * self.unroll_temp[t].exp() for s in scores]) if needs_soft else None
            if self.config.weighted_costs:
                weights = self.term_weights[t]
            costs = cross(soft, weights)
            scores = [self.unroll_keep[t] * s + self.unroll_cost[t] * c for s, c in zip(scores, costs)]
            if codes is not None:  # the same cost on learned edge codes
                w = _EDGE_GAIN * self.unroll_edge[t]
                scores = [s + w * c for s, c in zip(scores, _edge_costs(*codes, soft))]
        return scores

    def align(self, a: WeightSpace, b: WeightSpace) -> list[torch.Tensor]:
        """Hungarian answer for one pair (weight spaces of one network each): per hidden layer,
        ``perm[i]`` = B's unit for A's unit ``i``.

        Raises:
            OutOfFamilyError: the networks are outside this aligner's family.
            ModelMergeError: A and B differ in shape.
        """
        self.check_supports(a)
        if a.signature() != b.signature():
            raise ModelMergeError("the two networks differ in shape; pass two checkpoints of one architecture")
        dtype = next(self.parameters()).dtype
        # inference mode, not just no_grad: no view or version tracking per operation (0.89x the time of
        # a digits-CNN forward, which is ~1,600 small operations); the answers are built outside it, so
        # they are ordinary tensors that callers may modify in place
        with torch.inference_mode():
            scores = self(a.to(dtype), b.to(dtype))
        return [hungarian(s[0]) for s in scores]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def widen(model: DeepAlign, factor: int, noise: float = 0.01, seed: int = 0) -> DeepAlign:
    """A copy of ``model`` with ``factor`` times the encoder channels and readout width, computing
    the same answers before ``noise``: the Net2Net widening by duplication.

    Every channel (and readout unit) is copied ``factor`` times and the weights that read them are
    divided by ``factor``, so each layer's output is its old output, copied. The LayerNorms stay
    exact too: a vector copied ``factor`` times has the mean and variance of the original. Then
    ``noise`` times each copied matrix's standard deviation is added to it, so that the copies get
    different gradients (exact copies would stay copies under any optimiser).

    Args:
        model: the aligner to widen.
        factor: 1 or more (1 returns a copy).
        noise: relative noise on the copied weight matrices (0: the answers are unchanged).
        seed: seeds the noise.

    Returns:
        The wider aligner; ``config.channels`` and ``config.readout_hidden`` are multiplied by ``factor``.

    Raises:
        ModelMergeError: ``factor`` below 1, or an odd readout width (its second layer, of half
            that width, could not be copied exactly).
    """
    if factor < 1:
        raise ModelMergeError(f"the widening factor must be 1 or more, got {factor}")
    cfg = model.config
    c, h = cfg.channels, cfg.readout_hidden
    if h % 2 and factor > 1:
        raise ModelMergeError(f"cannot widen an aligner whose readout width is odd ({h}): its second readout "
                              "layer (half as wide) has no exact copy; train a wider one instead")
    param = next(model.parameters())
    wide = DeepAlign(replace(cfg, channels=c * factor, readout_hidden=h * factor)).to(param.device, param.dtype)

    def tile(t: torch.Tensor, dim: int, split: bool) -> torch.Tensor:
        return torch.cat([t] * factor, dim) / (factor if split else 1)

    g = torch.Generator().manual_seed(seed)
    old, state = model.state_dict(), {}
    for key, t in old.items():
        name = key.split(".")
        if name[0] in ("edge_role", "edge_kind", "node_role"):
            t = tile(t, 1, False)  # (roles, C)
        elif name[0] in ("tap_stats", "tap_conv", "bias_in"):
            t = tile(t, 0, False)  # (C, ...) outputs
        elif name[0] == "layers":
            t = tile(t, 0, False)
            if t.ndim == 2:  # lin weights (C, C) also read the copied channels
                t = tile(t, 1, True)
        elif name[0] in ("probe", "input_importance", "edge_proj") and name[1] == "weight":
            t = tile(t, 1, True)
        elif name[0] == "readout" and h:
            i = int(name[1])  # Linear layers 0, 2, 4: the first reads [V, E_in, E_out, rest], the last writes features
            if name[2] == "weight" and i == 0:
                blocks = list(t[:, :3 * c].split(c, 1)) + [t[:, 3 * c:]]
                t = torch.cat([tile(x, 1, True) for x in blocks[:3]] + blocks[3:], 1)
            elif name[2] == "weight":
                t = tile(t, 1, True)
            if i < 4:
                t = tile(t, 0, False)
        elif name[0] == "readout" and name[1] == "0" and name[2] == "weight":  # the v1 readout
            t = torch.cat([tile(x, 1, True) for x in t.split(c, 1)], 1)
        if factor > 1 and noise > 0 and t.ndim == 2 and t.shape != old[key].shape:
            t = t + noise * t.std() * torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)
        state[key] = t
    wide.load_state_dict(state)
    return wide
