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


def test_bundled_cards_carry_their_hold_out_numbers():
    from modelmerge.deepalign.pretrained import list_aligners

    for w in list_aligners():
        families = w.card["holdout"]["families"]
        assert families, w.name
        for r in families.values():
            assert 0 < r["learned"] and 0 < r["weight_matching"] and r["wins"].endswith("/10")


def test_aligners_command_lists_names_and_hold_out_ratios():
    import json

    from typer.testing import CliRunner

    from modelmerge.cli.app import app
    from modelmerge.deepalign.pretrained import list_aligners

    r = CliRunner().invoke(app, ["aligners"])
    assert r.exit_code == 0, r.output
    for w in list_aligners():
        assert w.name in r.output
        for fam, x in w.card["holdout"]["families"].items():
            assert f"{fam} {x['learned'] / x['weight_matching']:.2f}x" in r.output
    r = CliRunner().invoke(app, ["aligners", "--json"])
    assert {c["name"] for c in json.loads(r.stdout)} == {w.name for w in list_aligners()}
