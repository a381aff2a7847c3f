"""Packaging: every subpackage is listed for the wheel, and bundled data is found."""

from __future__ import annotations

from pathlib import Path

import tomllib

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


def test_aligners_command_lists_names_and_hold_out_ratios(monkeypatch):
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from modelmerge.cli.app import app
    from modelmerge.deepalign import pretrained

    def fake(name, card):
        return pretrained.AlignerWeights(name, "mlp", (3, 4), Path(f"{name}.safetensors"), "0" * 64, card)

    cards = {
        "held-out": {"name": "held-out", "holdout": {"families": {
            "fam-a": {"learned": 0.02, "weight_matching": 0.08}, "fam-b": {"learned": 0.3, "weight_matching": 0.2}}}},
        "validated": {"name": "validated", "validation": {"barrier": 0.05, "weight_matching_barrier": 0.1}},
        "bare": {"name": "bare"},
    }
    monkeypatch.setattr(pretrained, "list_aligners", lambda: [fake(n, c) for n, c in cards.items()])
    r = CliRunner().invoke(app, ["aligners"])
    assert r.exit_code == 0, r.output
    lines = {line.split()[1]: line for line in r.output.splitlines() if line.split()[1:2] and
             line.split()[1] in cards}
    assert "fam-a 0.25x" in lines["held-out"] and "fam-b 1.50x" in r.output
    assert "0.50x (validation)" in lines["validated"]
    assert lines["bare"].rstrip(" │|").endswith("-")
    r = CliRunner().invoke(app, ["aligners", "--json"])
    assert [c["name"] for c in json.loads(r.stdout)] == list(cards)


def test_aligners_table_writes_depth_runs_as_ranges():
    from typer.testing import CliRunner

    from modelmerge.cli.aligners import _depths
    from modelmerge.cli.app import app

    assert _depths((2, 3, 4, 5, 6)) == "2-6" and _depths((3, 4)) == "3,4" and _depths((2, 4, 5)) == "2,4,5"
    r = CliRunner().invoke(app, ["aligners"])
    assert r.exit_code == 0 and "deepalign-mlp-v4" in r.output and "2-6" in r.output


def test_the_align_function_stays_a_function_after_its_module_is_imported():
    """``modelmerge.align`` was both the function and the module defining it: once anything
    imported the module (the first ``mm.align`` call did), the package attribute became the
    module and every later ``mm.align(...)`` raised "'module' object is not callable" (found by
    a black-box sweep of the Python API). A fresh interpreter, so import order is real."""
    import subprocess
    import sys

    code = ("import modelmerge as mm; f = mm.align; import modelmerge.soup, modelmerge.alignment; "
            "assert mm.align is f and callable(mm.align), mm.align; "
            "from modelmerge import align; assert align is f")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
