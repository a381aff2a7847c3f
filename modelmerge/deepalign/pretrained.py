"""Loading aligners: a trained folder or file, or a bundled pretrained one by name.

Bundled aligners are typed records (torchvision's ``Weights`` idea): name,
file, sha256, family, supported depths and the numbers they reached. They live
in the package's ``pretrained/`` folder, each as ``NAME.safetensors`` plus
``NAME.json`` (its card).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from modelmerge.deepalign.model import AlignerConfig, DeepAlign
from modelmerge.errors import ModelMergeError, one_line, parse_json, read_text


@dataclass(frozen=True)
class AlignerWeights:
    """A bundled, pretrained aligner.

    Attributes:
        name: registry name (``--aligner NAME``).
        family: ``"mlp"`` or ``"cnn"``.
        depths: layer counts (Linear/Conv) it was trained and validated on.
        path: its ``.safetensors`` file.
        sha256: of that file.
        card: everything else (training zoo and command, hold-out numbers).
        default: the family's default aligner (used by ``--method auto``).
    """

    name: str
    family: str
    depths: tuple[int, ...]
    path: Path
    sha256: str
    card: dict
    default: bool = False


def pretrained_dir() -> Path:
    """Where the bundled aligners are: the installed ``modelmerge.pretrained`` package,
    or the repository's top-level ``pretrained/`` when running from a source tree."""
    try:
        return Path(str(files("modelmerge.pretrained")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "pretrained"


@lru_cache(maxsize=1)
def _registry() -> dict[str, AlignerWeights]:
    folder = pretrained_dir()
    registry: dict[str, AlignerWeights] = {}
    if not folder.is_dir():
        return registry
    for card_path in sorted(folder.glob("*.json")):
        card = json.loads(card_path.read_text())
        name = card["name"]
        if name in registry:
            raise RuntimeError(f"duplicate bundled aligner name {name!r}")
        registry[name] = AlignerWeights(
            name=name, family=card["family"], depths=tuple(card["supported_depths"]),
            path=folder / card["file"], sha256=card["sha256"], card=card, default=bool(card.get("default")),
        )
    return registry


def list_aligners() -> list[AlignerWeights]:
    """Every bundled aligner."""
    return list(_registry().values())


def get_aligner(name: str) -> AlignerWeights:
    """A bundled aligner by name.

    Raises:
        ModelMergeError: no such name (the message lists the known ones).
    """
    reg = _registry()
    if name not in reg:
        known = ", ".join(reg) or "none bundled"
        raise ModelMergeError(f"unknown aligner {name!r}; known: {known} (or pass a trained folder/file path)")
    return reg[name]


def default_aligner(family: str, depth: int) -> AlignerWeights | None:
    """The family's default bundled aligner if it supports ``depth`` layers."""
    for w in _registry().values():
        if w.default and w.family == family and depth in w.depths:
            return w
    return None


def _model_from_file(path: Path, card: object) -> DeepAlign:
    from modelmerge.checkpoint import load_checkpoint

    if not isinstance(card, dict) or not isinstance(card.get("config"), dict):
        raise ModelMergeError(f"{path}: its aligner card has no 'config' object; re-train or re-download it")
    try:
        model = DeepAlign(AlignerConfig.from_dict(card["config"]))
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ModelMergeError(f"{path}: its aligner config is unusable ({one_line(e)}); re-train it") from None
    state = load_checkpoint(path).state
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelMergeError(f"{path} does not match its aligner config ({str(e).splitlines()[0]})") from None
    return model.eval()


def _json(text: str, where: Path) -> object:
    return parse_json(text, str(where), fix="re-train the aligner or restore the file")


def load_aligner(name_or_path: str | Path) -> tuple[DeepAlign, dict]:
    """Load an aligner: a bundled name, a folder from ``train-aligner``, or its ``.safetensors``.

    Returns:
        ``(model in eval mode, card)``.

    Raises:
        ModelMergeError: nothing found, or an unreadable aligner (file, card or config named).
    """
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        card_file, weights = p / "aligner.json", p / "aligner.safetensors"
        if not weights.is_file() or not card_file.is_file():
            raise ModelMergeError(f"{p} holds no trained aligner (aligner.safetensors + aligner.json)")
        card = _json(read_text(card_file, "aligner card"), card_file)
        return _model_from_file(weights, card), card
    if p.is_file():
        from safetensors import SafetensorError, safe_open

        from modelmerge.checkpoint import utf8_name

        try:
            with utf8_name(p) as name, safe_open(name, framework="pt") as f:
                raw = (f.metadata() or {}).get("modelmerge.aligner")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelMergeError(f"{p} is not a modelmerge aligner (not a readable safetensors file: "
                                  f"{one_line(e)})") from None
        if raw is None:
            raise ModelMergeError(f"{p} is not a modelmerge aligner (no 'modelmerge.aligner' metadata)")
        card = _json(raw, p)
        return _model_from_file(p, card), card
    weights = get_aligner(str(name_or_path))
    return _model_from_file(weights.path, weights.card), weights.card
