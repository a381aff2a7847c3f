"""The example checkpoints bundled with the package (used by ``modelmerge demo``).

Two digits MLPs 64-128-128-128-10 trained from different seeds, and the digits
test split (359 images, stored as the dataset's original 0..16 integers), so the
demo runs with no dataset package installed. Regenerate with
``python -m modelmerge.examples`` (rewrites ``modelmerge/examples/``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch

from modelmerge.data import Dataset

RECORD = {"family": "mlp", "widths": [64, 128, 128, 128, 10], "activation": "relu"}
SEEDS = (90_001, 90_002)  # outside every zoo seed range used for the bundled aligners
FILES = ("mlp_a.safetensors", "mlp_b.safetensors")
TEST_FILE = "digits_test.safetensors"


def examples_dir() -> Path:
    """The folder holding the bundled example files."""
    return Path(str(files("modelmerge") / "examples"))


def example_paths() -> tuple[Path, Path]:
    d = examples_dir()
    return d / FILES[0], d / FILES[1]


def example_test_data() -> Dataset:
    """The bundled digits test split (the demo evaluates on it; train = test here)."""
    from safetensors.torch import load_file

    t = load_file(str(examples_dir() / TEST_FILE))
    x = t["x"].to(torch.float32) / 16.0
    y = t["y"].to(torch.long)
    return Dataset("digits (bundled test split)", x, y, x, y)


def build_examples(folder: Path) -> None:
    """Train the two example MLPs and write them and the test split to ``folder``."""
    from safetensors.torch import save_file

    from modelmerge.archs import record_to_json
    from modelmerge.checkpoint import META_PREFIX, save_checkpoint
    from modelmerge.data import digits
    from modelmerge.zoo.train import TrainConfig, train_models

    torch.set_num_threads(1)
    data = digits()
    models = train_models(RECORD, data, list(SEEDS), TrainConfig(epochs=30))
    for m, name in zip(models, FILES):
        meta = {META_PREFIX + "arch": record_to_json(RECORD), META_PREFIX + "seed": str(m.seed),
                META_PREFIX + "dataset": "digits", META_PREFIX + "test_acc": repr(m.test_acc)}
        save_checkpoint(m.state, folder / name, meta, force=True)
    x = (data.x_test.flatten(1) * 16).round().to(torch.uint8)
    save_file({"x": x, "y": data.y_test.to(torch.uint8)}, str(folder / TEST_FILE))


if __name__ == "__main__":
    build_examples(Path(__file__).resolve().parent)
