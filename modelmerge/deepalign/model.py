"""DEEP-ALIGN: a permutation-equivariant network that reads two networks and aligns them.

``F = project ∘ affinity ∘ readout ∘ encoder``:

* **encoder** (shared by A and B): layers over the canonical weight space
  (:mod:`modelmerge.weightspace`). Each layer holds edge features
  ``E_l [N, n_l, n_{l-1}, C]`` and node features ``V_l [N, n_l, C]`` and mixes
  every block with its row, column and global *means* and with the nodes at
  both ends of its edges (a DWS/NP-style equivariant layer). Means, not sums,
  and per-layer weight normalisation keep it indifferent to widths; shared
  weights with role embeddings (first / middle / last layer, input / hidden /
  output nodes) let one aligner serve any depth. No parameter's shape depends
  on a width or on the input or output size.
* **probes** (MLP family): learned probe inputs generated per input unit from
  the encoder's input-node features of A and B together, run through both
  networks; each hidden unit's standardised responses join its features. This
  lets the aligner do a learned form of activation matching without data.
* **readout**: per hidden unit, ``[V_l, mean of incoming edges, mean of outgoing
  edges, probe responses] -> MLP -> L2-normalised feature``.
* **affinity**: ``S_l = scale * F_A F_B^T`` (rows: A's units, columns: B's).
* **projection**: log-domain Sinkhorn while training, the Hungarian algorithm
  at inference.

Symmetries (tested): permuting A's hidden units by g and B's by g' turns the
answer k into g k g'^T; swapping A and B transposes it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from modelmerge.errors import ModelMergeError
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
        probes: number of learned probe inputs (MLP family; 0 turns probes off).
        depths: numbers of layers (Linear/Conv) the aligner was trained on; the
            network itself accepts any depth >= 2, `auto` only trusts these.
        conv_taps: kernel tap counts with a dedicated embedding (9 = 3x3, 3 = 3-tap 1-d).
        equivariant: False builds the deliberately broken negative control, which
            gives hidden units a feature of their index.
    """

    family: str = "mlp"
    channels: int = 16
    layers: int = 3
    feature_dim: int = 32
    probes: int = 32
    depths: tuple[int, ...] = (4,)
    conv_taps: tuple[int, ...] = (9, 3)
    equivariant: bool = True

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


def hungarian(scores: torch.Tensor) -> torch.Tensor:
    """Hard assignment maximising ``scores [n, n]``: ``perm[i]`` = column matched to row ``i``."""
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


class _Mix(nn.Module):
    """Per-entry LayerNorm + ReLU after an update, with a residual connection."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, old: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        return old + F.relu(self.norm(update))


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

    def forward(self, E: list[torch.Tensor], V: list[torch.Tensor]) -> tuple[list, list]:
        lin = self.lin
        rows = [e.mean(2) for e in E]  # (N, n_out, C): per unit, over its incoming edges
        cols = [e.mean(1) for e in E]  # (N, n_in, C): per unit, over its outgoing edges
        new_e = []
        for l, e in enumerate(E):
            upd = lin["e"](e)
            upd = upd + (lin["row"](rows[l]) + lin["v_out"](V[l + 1]))[:, :, None, :]
            upd = upd + (lin["col"](cols[l]) + lin["v_in"](V[l]))[:, None, :, :]
            upd = upd + lin["all"](e.mean((1, 2)))[:, None, None, :]
            new_e.append(self.mix_e(e, upd))
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
        c = config.channels
        self.tap_stats = nn.Linear(4, c)
        self.tap_conv = nn.ModuleDict({str(t): nn.Linear(t, c, bias=False) for t in config.conv_taps})
        self.edge_role = nn.Embedding(len(ROLES_EDGE), c)
        self.edge_kind = nn.Embedding(len(KINDS), c)
        self.node_role = nn.Embedding(len(ROLES_NODE), c)
        self.bias_in = nn.Linear(1, c)
        self.layers = nn.ModuleList(EquivariantLayer(c) for _ in range(config.layers))
        k = config.probes if config.family == "mlp" else 0
        self.probe = nn.Linear(c, k) if k else None
        self.readout = nn.Sequential(nn.Linear(3 * c + k, 2 * config.feature_dim), nn.ReLU(),
                                     nn.Linear(2 * config.feature_dim, config.feature_dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.position = None if config.equivariant else nn.Linear(1, c)

    # ------------------------------------------------------------------ checks
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
            if kind == "conv" and str(w.shape[2]) not in self.tap_conv:
                raise OutOfFamilyError(
                    f"this aligner knows conv kernels with {', '.join(map(str, self.config.conv_taps))} taps, "
                    f"not {w.shape[2]}; use --method weight-matching"
                )

    # ----------------------------------------------------------------- encoder
    def _embed(self, weights: list[torch.Tensor], biases: list[torch.Tensor], kinds: tuple[str, ...]):
        L = len(weights)
        E, V = [], []
        for l, (w, kind) in enumerate(zip(weights, kinds)):
            # per network and layer, scale-free: weights and biases divided by the weights' RMS
            rms = w.pow(2).mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12).sqrt()  # (N,1,1,1)
            w = w / rms
            stats = torch.stack([w.mean(-1), w.pow(2).mean(-1).sqrt(), w.amax(-1), w.amin(-1)], -1)
            e = self.tap_stats(stats)  # (N, n_out, n_in, C)
            if kind == "conv":
                e = e + self.tap_conv[str(w.shape[-1])](w)
            role = "only" if L == 1 else "first" if l == 0 else "last" if l == L - 1 else "middle"
            e = e + self.edge_role.weight[ROLES_EDGE.index(role)] + self.edge_kind.weight[KINDS.index(kind)]
            E.append(e)
            V.append(self.bias_in((biases[l] / rms[:, :, 0, 0])[..., None]))  # node l+1 from its bias
        n_in = weights[0].shape[2]
        v0 = torch.zeros(weights[0].shape[0], n_in, self.config.channels, dtype=weights[0].dtype)
        V = [v0] + V
        for l, v in enumerate(V):
            role = "input" if l == 0 else "output" if l == L else "hidden"
            V[l] = v + self.node_role.weight[ROLES_NODE.index(role)]
            if self.position is not None and 0 < l < L:  # negative control: unit index leaks in
                pos = torch.linspace(0, 1, v.shape[1], dtype=v.dtype)[None, :, None]
                V[l] = V[l] + self.position(pos)
        return E, V

    def encode(self, weights, biases, kinds):
        """Encoder features: edges ``E[l] [N, n_{l+1}, n_l, C]`` and nodes ``V[l] [N, n_l, C]``."""
        E, V = self._embed(weights, biases, kinds)
        for layer in self.layers:
            E, V = layer(E, V)
        return E, V

    def _probe_responses(self, weights, biases, probes):
        """Standardised pre-activations of every hidden unit on the probes: ``[N, n_l, K]``."""
        x = probes  # (N, K, n_0)
        out = []
        for l in range(len(weights) - 1):
            z = torch.baddbmm(biases[l][:, None, :], x, weights[l][..., 0].transpose(1, 2))  # (N, K, n_l)
            zs = (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-6)
            out.append(zs.transpose(1, 2))
            x = F.relu(z)
        return out

    def features(self, a: tuple, b: tuple) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Matching features of every hidden layer of A and B.

        Args:
            a, b: ``(weights, biases, kinds)`` of stacked networks (see
                :func:`modelmerge.weightspace.stack`), ``N`` pairs.

        Returns:
            Per hidden layer, ``(F_A [N, n_l, D], F_B [N, n_l, D])``, L2-normalised.
        """
        enc_a, enc_b = self.encode(*a), self.encode(*b)
        probe_a = probe_b = None
        if self.probe is not None:
            # the same probes for both networks, symmetric in A and B
            probes = self.probe(enc_a[1][0] + enc_b[1][0]).transpose(1, 2)  # (N, K, n_0)
            probe_a = self._probe_responses(a[0], a[1], probes)
            probe_b = self._probe_responses(b[0], b[1], probes)
        feats = []
        for l in range(1, len(a[0])):
            pair = []
            for (E, V), probe in ((enc_a, probe_a), (enc_b, probe_b)):
                parts = [V[l], E[l - 1].mean(2), E[l].mean(1)]
                if probe is not None:
                    parts.append(probe[l - 1])
                pair.append(F.normalize(self.readout(torch.cat(parts, -1)), dim=-1))
            feats.append((pair[0], pair[1]))
        return feats

    def forward(self, a: tuple, b: tuple) -> list[torch.Tensor]:
        """Affinity logits per hidden layer: ``[N, n_l (A), n_l (B)]``."""
        scale = self.log_scale.exp()
        return [scale * torch.einsum("nid,njd->nij", fa, fb) for fa, fb in self.features(a, b)]

    @torch.no_grad()
    def align(self, a: WeightSpace, b: WeightSpace) -> list[torch.Tensor]:
        """Hungarian answer for one pair: per hidden layer, ``perm[i]`` = B's unit for A's unit ``i``.

        Raises:
            OutOfFamilyError: the networks are outside this aligner's family.
            ModelMergeError: A and B differ in shape.
        """
        self.check_supports(a)
        if a.signature() != b.signature():
            raise ModelMergeError("the two networks differ in shape; pass two checkpoints of one architecture")
        dtype = next(self.parameters()).dtype
        pack = lambda ws: ([w[None].to(dtype) for w in ws.weights], [x[None].to(dtype) for x in ws.biases], ws.kinds)
        return [hungarian(s[0]) for s in self(pack(a), pack(b))]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
