"""Datasets that exist offline: scikit-learn's digits, generated mnist1d, and user files.

Every dataset comes as a :class:`Dataset` with a fixed train/test split, so a
number measured today can be measured again tomorrow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from modelmerge.errors import DataError


@dataclass(frozen=True)
class Dataset:
    """Inputs and integer labels, split once.

    Attributes:
        name: dataset name or file path.
        x_train, x_test: float32 ``[N, *input_shape]``.
        y_train, y_test: int64 ``[N]`` class labels in ``[0, num_classes)``.
        note: how the inputs were read, when that is a guess worth saying (flat inputs read as
            channels-first images by :meth:`shaped`; 8-bit pixels read as 0..255 by :func:`from_file`).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    note: str | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return max((int(y.max()) for y in (self.y_train, self.y_test) if len(y)), default=-1) + 1

    def flat(self) -> Dataset:
        """The same data with each input flattened (for MLPs)."""
        return Dataset(self.name, self.x_train.flatten(1), self.y_train, self.x_test.flatten(1), self.y_test,
                       self.note)

    def shaped(self, input_shape: tuple[int, ...], num_outputs: int | None = None) -> Dataset:
        """The same data with each input reshaped to ``input_shape`` (e.g. flattened for an MLP).

        Args:
            input_shape: one example's shape as the model takes it.
            num_outputs: the model's output count, checked against the classes (None: unchecked).

        Raises:
            DataError: the sizes differ (or only a reordering of axes would fit), or there are more
                classes than outputs.
        """
        shape = tuple(input_shape)
        if self.input_shape != shape:
            # flatten (MLPs), unflatten ([N, 64] -> [N, 1, 8, 8]) or add/drop unit axes; never reorder
            # axes of equal size (HWC data is not CHW data)
            plain = len(shape) == 1 or len(self.input_shape) == 1 or (
                [d for d in shape if d != 1] == [d for d in self.input_shape if d != 1])
            if not plain or math.prod(self.input_shape) != math.prod(shape):
                last = (len(shape) >= 2 and len(self.input_shape) == len(shape)
                        and tuple(self.input_shape) == (*shape[1:], shape[0]))
                hint = (f"; the data looks channels-last: transpose it to channels first, "
                        f"x.transpose(0, {len(shape)}, {', '.join(str(i) for i in range(1, len(shape)))})"
                        if last else "")
                raise DataError(f"{self.name} inputs have shape {list(self.input_shape)} but the model expects "
                                f"{list(shape)}{hint}")
            note = self.note
            if len(self.input_shape) == 1 and len(shape) >= 2 and shape[0] > 1:
                # a flat vector of a multi-channel image could be in either order: say which is assumed
                said = (f"{self.name}: flat inputs of {self.input_shape[0]} values read as {list(shape)} in that "
                        f"axis order (x.reshape(-1, {', '.join(map(str, shape))})); data flattened in another order "
                        "(channels-last) must be transposed first")
                note = f"{note}; {said}" if note else said
            data = Dataset(self.name, self.x_train.reshape(-1, *shape), self.y_train,
                           self.x_test.reshape(-1, *shape), self.y_test, note)
        else:
            data = self
        if num_outputs is not None and self.num_classes > num_outputs:
            ys = [y for y in (self.y_train, self.y_test) if len(y)]
            start = min(int(y.min()) for y in ys) if ys else 0
            hint = (f"; its labels run {start}..{self.num_classes - 1}, and labels are class indices from 0 "
                    "(subtract 1)" if start == 1 and self.num_classes - 1 == num_outputs else "")
            raise DataError(f"{self.name} has {self.num_classes} classes but the model outputs {num_outputs}{hint}")
        return data


def _split(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.long)
    return Dataset(name, xt[train], yt[train], xt[test], yt[test])


def digits() -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, 10 classes) as ``[N, 1, 8, 8]`` in [0, 1].

    Read from a copy bundled in ``modelmerge/examples/digits.safetensors`` (115 KiB, the
    values of ``sklearn.datasets.load_digits``, UCI Optical Recognition of Handwritten
    Digits, CC BY 4.0): importing scikit-learn's datasets takes over a second, more than a
    whole weight-matching run. Split: a fixed shuffle (seed 0), 20 % test (359 images), the
    rest train.
    """
    from importlib.resources import files

    from safetensors.numpy import load

    d = load((files("modelmerge.examples") / "digits.safetensors").read_bytes())
    return _split("digits", (d["images"].astype(np.float64) / 16.0)[:, None], d["target"].astype(np.int64))


def mnist1d() -> Dataset:
    """mnist1d (Greydanus), generated locally with its default settings: ``[N, 1, 40]``.

    Uses ``mnist1d.data.make_dataset`` (never its download path); its own
    train/test split (4000/1000) is kept.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DataError(
            "the mnist1d dataset needs the mnist1d package; install it with "
            "pip install 'modelmerge-align[data]'"
        ) from None
    d = make_dataset(get_dataset_args())
    f = torch.float32
    return Dataset(
        "mnist1d",
        torch.as_tensor(d["x"], dtype=f)[:, None], torch.as_tensor(d["y"], dtype=torch.long),
        torch.as_tensor(d["x_test"], dtype=f)[:, None], torch.as_tensor(d["y_test"], dtype=torch.long),
    )


def teacher() -> Dataset:
    """A synthetic task: 32 Gaussian inputs labelled by a fixed random teacher network (10 classes).

    ``x ~ N(0, I_32)``; the label is the argmax of ``tanh(x W1) W2`` (W1 32x64, W2
    64x10, drawn with seed 0; each class's logit is centred over the data so the
    classes are about equally common). 5000 examples, split 80/20 (seed 0).
    Needs nothing beyond NumPy; its inputs are ``[N, 32]``.
    """
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((32, 64)) / np.sqrt(32)
    w2 = rng.standard_normal((64, 10)) / np.sqrt(64)
    x = rng.standard_normal((5000, 32))
    logits = np.tanh(x @ w1 * 2.0) @ w2
    y = np.argmax(logits - logits.mean(0), axis=1)
    return _split("teacher", x.astype(np.float32), y)


def from_file(path: str | Path) -> Dataset:
    """Load ``x`` and ``y`` arrays from ``.npz`` or ``.safetensors``; split 80/20 (seed 0).

    If the file also has ``x_test`` and ``y_test``, they are the test split. ``x_train`` and
    ``y_train`` (Keras' names) are read as ``x`` and ``y`` when those are absent.

    Raises:
        DataError: missing file, missing arrays, or arrays of the wrong shape.
    """
    p = Path(path)
    if p.exists() and not p.is_file():
        what = "a folder" if p.is_dir() else "not a regular file (a pipe or device)"
        raise DataError(f"data file {p} is {what}; pass an .npz/.safetensors file with arrays 'x' and 'y'")
    if not p.is_file():
        raise DataError(f"data file {p} not found; pass digits, mnist1d, teacher or an .npz/.safetensors file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        elif suffix == ".safetensors":
            arrays = _safetensors_arrays(p)
        else:
            raise DataError(f"data file {p} must be .npz or .safetensors with arrays 'x' and 'y'")
    except DataError:
        raise
    except Exception as e:  # numpy/safetensors raise many types for corrupt files
        import zipfile

        # a sound .npz of object arrays (pickles); numpy says the same of a file that is no .npz at all
        if isinstance(e, ValueError) and "allow_pickle" in str(e) and zipfile.is_zipfile(p):
            raise DataError(f"data file {p} holds object arrays (pickled Python objects, never loaded here); save "
                            "numeric arrays instead, e.g. np.savez(path, x=x.astype(np.float32), "
                            "y=y.astype(np.int64))") from None
        raise DataError(f"cannot read data file {p} ({type(e).__name__}: {e}); is it corrupt?") from None
    if "x" not in arrays and "y" not in arrays and "x_train" in arrays and "y_train" in arrays:
        # Keras' load_data() names: the training split under x_train/y_train
        arrays["x"], arrays["y"] = arrays.pop("x_train"), arrays.pop("y_train")
    for key in ("y", "y_test"):  # labels as a column [N, 1] (Keras' CIFAR): one label per example all the same
        if key in arrays and arrays[key].ndim == 2 and arrays[key].shape[1] == 1:
            arrays[key] = arrays[key][:, 0]
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"data file {p} lacks array(s) {', '.join(missing)}; it needs 'x' (inputs) and 'y' (labels)")

    def _check(x, y, what):
        if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
            raise DataError(
                f"data file {p}: {what} must be [N, ...] inputs and [N] labels, got {list(x.shape)} and {list(y.shape)}"
            )
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
                or x.dtype == np.bool_):
            raise DataError(f"data file {p}: {what} inputs must be numbers, not {x.dtype}")
        # finite as the float32 the models read: 1e300 in float64 is finite, and infinite once cast
        with np.errstate(over="ignore"):  # the overflow is what is checked here
            finite = not np.issubdtype(x.dtype, np.floating) or np.isfinite(x.astype(np.float32, copy=False)).all()
        if not finite:
            raise DataError(f"data file {p}: {what} inputs contain NaN or infinite values (or values beyond "
                            "float32's range, ~3.4e38); clean or rescale the data first")
        if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
            raise DataError(f"data file {p}: {what} labels must be non-negative integers")
        if len(y) and int(y.max()) >= 2**31:  # class indices; uint64 beyond int64 would wrap to negatives
            raise DataError(f"data file {p}: {what} labels go up to {int(y.max())}; labels are class indices "
                            "0..classes-1")

    x, y = arrays["x"], arrays["y"]
    _check(x, y, "x/y")
    if len(x) < 2:
        raise DataError(f"data file {p} has {len(x)} example(s); it needs at least 2 (a train and a test split)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        have, lack = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise DataError(f"data file {p} has {have} but no {lack}; give both (a test split) or neither "
                        "(an 80/20 split of x and y)")
    note = None
    if x.dtype == np.uint8 and x.size and int(x.max()) > 1:
        # 8-bit images are usually scaled to [0, 1] (or standardised) before a model sees them; reading them
        # raw gives such a model inputs up to 255x too large: every metric, REPAIR statistic and refinement
        # step then measures something else, with no error to show it
        note = (f"{p}: inputs are 8-bit integers up to {int(x.max())}, read as those values; for a model trained "
                "on inputs scaled to [0, 1], save x / 255 (as float32) instead")
    if "x_test" in arrays:
        _check(arrays["x_test"], arrays["y_test"], "x_test/y_test")
        if arrays["x_test"].shape[1:] != x.shape[1:]:
            raise DataError(f"data file {p}: x_test's examples have shape {list(arrays['x_test'].shape[1:])} but "
                            f"x's have {list(x.shape[1:])}; they must match")
        f = torch.float32
        return Dataset(str(p), torch.as_tensor(x, dtype=f), torch.as_tensor(y, dtype=torch.long),
                       torch.as_tensor(arrays["x_test"], dtype=f), torch.as_tensor(arrays["y_test"], dtype=torch.long),
                       note)
    return replace(_split(str(p), x, y), note=note)


def _safetensors_arrays(p: Path) -> dict[str, np.ndarray]:
    """A safetensors data file's arrays (through torch, which reads the dtypes NumPy lacks, bfloat16 among
    them; those are widened to float32)."""
    from safetensors.torch import load_file

    from modelmerge.checkpoint import utf8_name

    with utf8_name(p) as name:
        tensors = load_file(name)
    out = {}
    for k, t in tensors.items():
        if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
            t = t.float()
        out[k] = t.numpy()
    return out


def load_dataset(name: str) -> Dataset:
    """``digits``, ``mnist1d``, ``teacher`` (synthetic), or a path to an ``.npz``/``.safetensors`` file with ``x`` and ``y``.

    Raises:
        DataError: unknown name or bad file.
    """
    if name == "digits":
        return digits()
    if name == "mnist1d":
        return mnist1d()
    if name == "teacher":
        return teacher()
    if name.lower().endswith((".npz", ".safetensors")) or Path(name).exists():
        return from_file(name)
    raise DataError(f"unknown dataset {name!r}; use digits, mnist1d, teacher, or an .npz/.safetensors file with x and y")
