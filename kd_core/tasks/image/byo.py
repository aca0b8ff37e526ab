"""Bring-your-own images for `task: image`: ImageFolder directories (`data.source: folder`) and parquet
tables of encoded images (`parquet`), every image decoded (kd_core.tasks.image.data.decode) before any
unreadable one is reported."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kd_core.config import DataParams
from kd_core.data import Splits, read_parquet, sorted_classes
from kd_core.errors import UserError
from kd_core.tasks.image.data import (
    IMAGE_EXTENSIONS,
    SIZE_RANGE,
    _frame,
    _map,
    _probe,
    _schema,
    decode,
)


@dataclass(frozen=True)
class _Encoded:
    """One split's images before decoding."""

    sources: list[bytes | Path]  # the encoded bytes, or the file holding them
    where: list[str]  # how an error names each image
    files: list[str]  # FILE column
    labels: list | None  # None: unlabelled (transfer)


_Decoded = tuple[np.ndarray, tuple[int, int, int]]  # decode's answer: pixels, the original width, height, bands


def _decode_source(source: bytes | Path, where: str, size: int, channels: int) -> _Decoded | str:
    """`decode` of one image, its UserError as a string: every image is decoded before any is reported."""
    try:
        blob = source.read_bytes() if isinstance(source, Path) else source
    except OSError as exc:
        return f"{where}: not a readable image (cannot read the file: {exc.strerror or exc})"
    try:
        return decode(blob, size, channels, where)
    except UserError as exc:
        return str(exc)


def _shape(params: DataParams, train: _Encoded) -> tuple[int, int]:
    """data.image_size and data.channels, or what the training images suggest for each that is null."""
    size, channels = params.image_size, params.channels
    if size is not None and channels is not None:
        return size, channels
    probes = [p for p in _map(_probe, train.sources) if p is not None]
    if size is None:  # no readable image: any size, decoding refuses them all next
        median = float(np.median([side for side, _ in probes])) if probes else SIZE_RANGE[0]
        size = int(min(max(round(median), SIZE_RANGE[0]), SIZE_RANGE[1]))
    if channels is None:
        channels = 1 if all(bands in (1, 2) for _, bands in probes) else 3
    return size, channels


def _decoded_splits(params: DataParams, encoded: dict[str, _Encoded], classes: tuple) -> Splits:
    """Decode every split (all of them, then report the unreadable ones) into prepared frames."""
    size, channels = _shape(params, encoded["train"])
    jobs = [(s, w) for e in encoded.values() for s, w in zip(e.sources, e.where, strict=True)]
    results = _map(lambda job: _decode_source(job[0], job[1], size, channels), jobs)
    bad = [r for r in results if isinstance(r, str)]
    if bad:
        raise UserError(bad[0] + (f"; {len(bad)} unreadable images in all" if len(bad) > 1 else ""))
    decoded = [r for r in results if not isinstance(r, str)]
    frames, start, train_pixels = {}, 0, np.zeros((0, channels, size, size), np.uint8)
    for name, e in encoded.items():
        part = decoded[start:start + len(e.sources)]
        start += len(e.sources)
        pixels = np.stack([p for p, _ in part]) if part else np.zeros((0, channels, size, size), np.uint8)
        sizes = np.array([o for _, o in part], dtype=np.int64).reshape(-1, 3)
        label = params.label_column if e.labels is not None else None
        frames[name] = _frame(pixels, e.files, sizes, label, e.labels)
        if name == "train":
            train_pixels = pixels
    if "transfer" not in frames:
        frames["transfer"] = frames["train"].drop(columns=[params.label_column]).iloc[:0]
    return Splits(frames["train"], frames["test"], frames["transfer"], _schema(params, classes, train_pixels))


def _directory(root: Path, rel: str, what: str) -> Path:
    path = root / rel
    if not path.exists():
        raise UserError(f"{what} {path}: directory not found")
    if not path.is_dir():
        raise UserError(f"{what} {path}: not a directory (data.source folder reads folders of image files)")
    return path


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _image_files(folder: Path, what: str) -> list[Path]:
    """Every visible file under `folder`, sorted; any that is not an image by its extension is refused."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    found.sort(key=lambda p: p.relative_to(folder).as_posix())
    other = [p for p in found if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if other:
        raise UserError(f"{other[0]}: not an image file by its extension (reads {' '.join(IMAGE_EXTENSIONS)}); "
                        f"{len(other)} such file(s) under {what} {folder}: move them out or hide them (a name "
                        "starting with '.')")
    return found


def _class_folder(folder: Path, what: str) -> dict[str, list[Path]]:
    """ImageFolder layout: {class name: its images (any depth)}; a file outside any class is refused."""
    loose = sorted(p for p in folder.iterdir() if _visible(p) and not p.is_dir())
    if loose:
        raise UserError(f"{loose[0]}: outside any class folder ({len(loose)} such file(s)); {what} {folder} "
                        "holds one folder per class: <dir>/<class name>/<images>")
    images = _image_files(folder, what)
    by_class: dict[str, list[Path]] = {p.name: [] for p in sorted(folder.iterdir()) if _visible(p) and p.is_dir()}
    for p in images:
        by_class[p.relative_to(folder).parts[0]].append(p)
    return by_class


def _folder_encoded(folder: Path, images: list[Path], labels: list | None) -> _Encoded:
    return _Encoded(list(images), [str(p) for p in images], [p.relative_to(folder).as_posix() for p in images],
                    labels)


def folder_splits(params: DataParams, root: Path) -> Splits:
    """torchvision ImageFolder layout: data.train and data.test hold <class>/**/<image>, class = the
    first-level folder; data.transfer (optional) is a folder of unlabelled images at any depth."""
    assert params.train and params.test  # config: a file source needs data.train and data.test
    train_dir = _directory(root, params.train, "data.train")
    test_dir = _directory(root, params.test, "data.test")
    train = _class_folder(train_dir, "data.train")
    if not train:
        raise UserError(f"data.train {train_dir}: no class folders (expected <dir>/<class name>/<images>)")
    empty = [c for c, files in train.items() if not files]
    if empty:
        raise UserError(f"data.train {train_dir / empty[0]}: class folder {empty[0]!r} has no images"
                        + (f" ({len(empty)} empty class folders)" if len(empty) > 1 else ""))
    test = _class_folder(test_dir, "data.test")
    unknown = [c for c in test if c not in train]
    if unknown:
        raise UserError(f"data.test {test_dir / unknown[0]}: class {unknown[0]!r} is not one of the training "
                        f"classes {sorted(train)[:8]}")
    if not any(test.values()):
        raise UserError(f"data.test {test_dir}: no images")

    def labelled(folder: Path, by_class: dict[str, list[Path]]) -> _Encoded:
        return _folder_encoded(folder, [p for files in by_class.values() for p in files],
                               [c for c, files in by_class.items() for _ in files])

    encoded = {"train": labelled(train_dir, train), "test": labelled(test_dir, test)}
    if params.transfer:
        transfer_dir = _directory(root, params.transfer, "data.transfer")
        encoded["transfer"] = _folder_encoded(transfer_dir, _image_files(transfer_dir, "data.transfer"), None)
    return _decoded_splits(params, encoded, tuple(train))


def _cell_bytes(value: Any, path: Path, column: str, row: int) -> bytes:
    """Encoded bytes of one cell: bytes, or a Hugging Face Image struct {"bytes": ..., "path": ...}."""
    where = f"{path}: column {column!r} row {row}"
    if isinstance(value, dict):
        if value.get("bytes") is None:
            stored = f" (only the path {value['path']!r})" if value.get("path") else ""
            raise UserError(f"{where}: an image struct without bytes{stored}; embed the image bytes in the table")
        value = value["bytes"]
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        raise UserError(f"{where}: null, not encoded image bytes")
    raise UserError(f"{where}: a {type(value).__name__} value, not encoded image bytes (PNG, JPEG, ...)")


def _parquet_encoded(params: DataParams, path: Path, split: str) -> _Encoded:
    col, label = params.image_column, params.label_column
    df = read_parquet(path, f"data.{split}")
    if col not in df.columns:
        raise UserError(f"{path}: image column {col!r} not found (columns: {list(df.columns)[:8]}); "
                        "set data.image_column")
    labelled = split != "transfer"
    if labelled and label not in df.columns:
        raise UserError(f"{path}: label column {label!r} not found (columns: {list(df.columns)[:8]}); "
                        "set data.label_column")
    if labelled and len(df) == 0:
        raise UserError(f"{path}: has 0 rows")
    sources: list[bytes | Path] = [_cell_bytes(v, path, col, i) for i, v in enumerate(df[col].tolist())]
    labels = None
    if labelled:
        nulls = np.flatnonzero(df[label].isna().to_numpy())
        if len(nulls):
            raise UserError(f"{path}: column {label!r} row {int(nulls[0])}: null label ({len(nulls)} null in all)")
        labels = df[label].tolist()
    rows = range(len(df))
    return _Encoded(sources, [f"{path} row {i}" for i in rows], [f"{path.name} row {i}" for i in rows], labels)


def parquet_splits(params: DataParams, root: Path) -> Splits:
    """The user's tables: encoded image bytes in data.image_column and labels in data.label_column (train,
    test), optional unlabelled transfer table."""
    assert params.train and params.test  # config: a file source needs data.train and data.test
    encoded = {split: _parquet_encoded(params, root / rel, split)
               for split, rel in (("train", params.train), ("test", params.test), ("transfer", params.transfer))
               if rel}
    assert encoded["train"].labels is not None
    return _decoded_splits(params, encoded, sorted_classes(pd.Series(encoded["train"].labels)))
