"""Packaging: every subpackage is listed for the wheel, and bundled data is found."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_packaged():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "modelmerge").rglob("__init__.py")}
    assert found | {"modelmerge.pretrained"} == listed


def test_bundled_aligner_cards_match_their_files():
    import hashlib
    import json

    from modelmerge.deepalign.pretrained import list_aligners, pretrained_dir

    cards = sorted(pretrained_dir().glob("*.json"))
    assert len(list_aligners()) == len(cards)
    for w in list_aligners():
        assert hashlib.sha256(w.path.read_bytes()).hexdigest() == w.sha256
        assert json.loads((pretrained_dir() / f"{w.name}.json").read_text())["family"] == w.family
