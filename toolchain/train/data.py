"""Datasets for the reference trainer: scikit-learn's digits, a user's .npz, or an image folder.

Whatever the source, the trainer gets one ``Splits``: float32 inputs shaped like the model's input
(batch axis first), int64 labels, a stratified, seeded train/val/test split, normalised with the
training split's statistics only. The network trains on standardised inputs, but the model that is
exported and registered takes raw inputs (the standardisation is its first step), so the held-out
test split is kept raw as well (``test_raw``): that is what a device feeds the deployed model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgesmith.toolchain.errors import UserError, first_line
from edgesmith.toolchain.train.config import TrainConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm"}


@dataclass
class Dataset:
    x: np.ndarray  # float32, (N, *input_shape[1:])
    y: np.ndarray  # int64, (N,)
    source: str
    classes: list[str]

    @property
    def digest(self) -> str:
        """sha256 over the raw inputs and labels (shape and dtype included), truncated like MLflow's."""
        h = hashlib.sha256()
        for array in (self.x, self.y):
            h.update(f"{array.dtype}{array.shape}".encode())
            h.update(np.asarray(array, order="C").tobytes())
        return h.hexdigest()[:16]


@dataclass
class Splits:
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    test_raw: np.ndarray  # the test inputs before normalising: what the registered model takes
    mean: float
    std: float
    classes: list[str]


def _digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64), [str(c) for c in digits.target_names]


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise UserError(f"dataset {path} is not a readable .npz file ({first_line(e)})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UserError(f"dataset {path} is a single .npy array, not an .npz with x and y; save both with "
                        "numpy.savez(FILE.npz, x=inputs, y=labels)")
    with data:
        if "x" not in data.files or "y" not in data.files:
            raise UserError(f"dataset {path} needs arrays named x (inputs) and y (integer labels); it has {', '.join(data.files) or 'none'}")
        try:
            x, y = data["x"], data["y"]
        except Exception as e:
            raise UserError(f"dataset {path} is not a readable .npz file ({first_line(e)})") from None
    if x.ndim == 0 or y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x):
        raise UserError(f"dataset {path}: y must be one integer label per row of x ({len(x) if x.ndim else 0} rows); "
                        f"it is {y.dtype} with shape {list(y.shape)}")
    if len(y) == 0:
        raise UserError(f"dataset {path} holds no samples (x and y are empty); give at least a few per class")
    if x.dtype.kind not in "fiub":
        raise UserError(f"dataset {path}: x has dtype {x.dtype}; give numbers")
    if y.min() < 0:
        raise UserError(f"dataset {path}: labels must be 0 or more (class indices); y holds {int(y.min())}")
    classes = [str(c) for c in range(int(y.max()) + 1)]
    return x.astype(np.float32), y.astype(np.int64), classes


def _image_folder(path: Path, shape: list[int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image

    if len(shape) != 4 or shape[1] not in (1, 3):
        raise UserError(f"an image folder needs input_shape [1, C, H, W] with C 1 or 3; the config has {shape}")
    channels, height, width = shape[1:]
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    xs, ys = [], []
    for label, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                image = Image.open(file).convert("L" if channels == 1 else "RGB").resize((width, height))
            except Exception as e:
                raise UserError(f"cannot read image {file} ({e}); remove it or replace it") from None
            array = np.asarray(image, dtype=np.float32)
            xs.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
            ys.append(label)
    if len(classes) < 2 or not xs:
        raise UserError(f"image folder {path} needs at least two class sub-folders holding images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return np.stack(xs), np.asarray(ys, np.int64), classes


def load_dataset(config: TrainConfig) -> Dataset:
    source = config.dataset.source
    if source == "sklearn:digits":
        x, y, classes = _digits()
    elif source.startswith("sklearn:"):
        raise UserError(f"dataset {source!r} is not built in; the built-in one is sklearn:digits, or give a .npz file or an image folder")
    else:
        path = Path(source)
        if path.is_dir():
            x, y, classes = _image_folder(path, config.input_shape)
        elif path.is_file():
            x, y, classes = _npz(path)
        else:
            raise UserError(f"dataset {source} does not exist; give sklearn:digits, a .npz file (x, y) or an image folder")
    sample_shape = list(config.input_shape[1:])
    if list(x.shape[1:]) != sample_shape:
        if int(np.prod(x.shape[1:])) != int(np.prod(sample_shape)):
            raise UserError(f"dataset {source}: one input has shape {list(x.shape[1:])}, the config's input_shape takes {sample_shape}")
        x = x.reshape(len(x), *sample_shape)
    return Dataset(x=np.asarray(x, np.float32, order="C"), y=y, source=source, classes=classes)


@dataclass
class ExtraData:
    """Labelled captured samples mixed into training and evaluation (``edgesmith train --extra-data``)."""

    x: np.ndarray  # raw inputs, as the devices fed them
    y: np.ndarray
    digest: str
    devices: list[str]
    path: str


def load_extra(name: str, config: TrainConfig, classes: list[str], root: Path | None = None) -> ExtraData:
    """A labelled dataset of captured samples (toolchain/data/datasets.py), checked against the config."""
    from edgesmith.toolchain.data.datasets import open_dataset

    dataset = open_dataset(name, root)
    if not dataset.labelled:
        raise UserError(f"dataset {dataset.digest[:12]} is not labelled; label it first: edgesmith data label "
                        f"{dataset.digest[:12]} --labels FILE.csv")
    arrays = dataset.arrays()
    inputs = dataset.meta["inputs"]
    if len(inputs) != 1:
        raise UserError(f"dataset {dataset.digest[:12]} holds {len(inputs)} inputs per sample; the trainer takes one")
    x, y = arrays[inputs[0]], arrays["y"]
    sample_shape = list(config.input_shape[1:])
    if int(np.prod(x.shape[1:])) != int(np.prod(sample_shape)):
        raise UserError(f"dataset {dataset.digest[:12]}: one input has shape {list(x.shape[1:])}, the config's "
                        f"input_shape takes {sample_shape}")
    if len(y) and int(y.max()) >= len(classes):
        raise UserError(f"dataset {dataset.digest[:12]} has class {int(y.max())}; the training data has {len(classes)} classes")
    return ExtraData(x=np.asarray(x, np.float32).reshape(len(x), *sample_shape), y=y.astype(np.int64),
                     digest=dataset.digest, devices=list(dataset.meta["devices"]), path=str(dataset.path))


def _split_extra(extra: ExtraData, config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the extra samples for train, val and test: a seeded permutation cut by the config's shares."""
    order = np.random.default_rng(config.seed).permutation(len(extra.y))
    n_test, n_val = int(round(len(order) * config.split.test)), int(round(len(order) * config.split.val))
    return order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test]


def extra_parts(extra: ExtraData, config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which extra samples ``split`` puts into train, val and test (indices into ``extra``)."""
    return _split_extra(extra, config)


def split(dataset: Dataset, config: TrainConfig, extra: ExtraData | None = None) -> Splits:
    """Stratified train/val/test split seeded by the config; normalised by the training split.
    ``extra`` samples are cut in the same shares by the same seed and appended to each split."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(dataset.y))
    try:
        rest, test = train_test_split(index, test_size=config.split.test, random_state=config.seed, stratify=dataset.y)
        val_share = config.split.val / (1 - config.split.test)
        train, val = train_test_split(rest, test_size=val_share, random_state=config.seed, stratify=dataset.y[rest])
    except ValueError as e:
        raise UserError(f"dataset {dataset.source} cannot be split as configured ({e}); give more samples per class or change [split]") from None
    x, y = dataset.x, dataset.y
    if extra is not None and len(extra.y):
        offset = len(y)
        parts = _split_extra(extra, config)
        x, y = np.concatenate([x, extra.x]), np.concatenate([y, extra.y])
        train, val, test = (np.concatenate([a, b + offset]) for a, b in zip((train, val, test), parts))
    raw = x
    mean, std = 0.0, 1.0
    if config.dataset.normalise == "standardise":
        mean, std = float(x[train].mean()), float(x[train].std()) or 1.0
        x = ((x - mean) / std).astype(np.float32)
    return Splits(train=(x[train], y[train]), val=(x[val], y[val]), test=(x[test], y[test]),
                  test_raw=raw[test], mean=mean, std=std, classes=dataset.classes)
