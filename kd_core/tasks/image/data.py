"""Images for `task: image`: the sources (Fashion-MNIST from the Debian package, a folder per class, the
user's parquet tables) decoded once into fixed-size uint8 pixels.

Every split becomes a frame with one row per image: its pixels (`PIXELS`, `channels`×`size`×`size` bytes,
C-order), where it came from (`FILE`), the original width, height and channel count (validation flags
images that resizing blew up) and the sha256 of the pixels (duplicates). Decoding is Pillow's, made
deterministic and total:

- EXIF orientation is applied first, so an image is read upright as a viewer shows it, and WIDTH/HEIGHT
  are the upright size;
- transparency is composited on white (a transparent icon reads as drawn on a white page, not on whatever
  colour its hidden pixels happen to hold);
- 16-bit (and 32-bit) greyscale is scaled to 8 bits (v / 257), where Pillow's own `convert` would clip it;
- the result is resized to a square with BILINEAR (aspect ratio not kept: like torchvision's Resize((S, S))).

Anything Pillow cannot read is a one-line UserError naming the first bad image and how many there are.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import struct
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from kd_core.config import DataParams
from kd_core.data import Schema, Splits
from kd_core.errors import UserError

PIXELS = "kd_pixels"  # bytes: the image as read by the models, uint8 (C, S, S) C-order
FILE = "kd_file"  # str: "t10k-images-idx3-ubyte.gz[123]", a path relative to the split's folder, "x.parquet row 17"
WIDTH, HEIGHT, BANDS = "kd_width", "kd_height", "kd_bands"  # int: the original (upright) size and channel count
DIGEST = "kd_sha256"  # str: sha256 hex of the PIXELS bytes (duplicate detection)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")  # in label order: the idx labels index it
BUILTIN_SOURCES = ("fashion_mnist",)
FILE_SOURCES = ("folder", "parquet")

FASHION_ENV = "KD_FASHION_MNIST_DIR"  # overrides the Debian directory (tests)
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FASHION_SIZE = 28
SIZE_RANGE = (8, 224)  # data.image_size null: the median longer side, kept within what a small CNN can afford
STD_FLOOR = 1e-3  # a constant channel (blank images) must not divide by zero when normalised
_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")
_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")  # more than 8 bits per sample: scaled, not clipped
_T = TypeVar("_T")
_R = TypeVar("_R")


# --- decoding -------------------------------------------------------------------------------------

def _bands(im: Image.Image) -> int:
    """Channels of the image as stored: a palette counts its colours' channels (+1 for transparency)."""
    if im.mode not in ("P", "PA"):
        return len(im.getbands())
    colours = len(im.palette.mode) if im.palette is not None else 3
    alpha = im.mode == "PA" or "transparency" in im.info
    return colours + 1 if alpha and colours in (1, 3) else colours


def _eight_bit(im: Image.Image) -> Image.Image:
    """A wide greyscale image as "L": 16-bit integers / 257, floats of [0, 1] × 255 (others clipped)."""
    a = np.nan_to_num(np.asarray(im, dtype=np.float64))
    if im.mode == "F":
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return Image.fromarray(np.rint(np.clip(a, 0, 65535) / 257.0).astype(np.uint8), "L")


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    """`im` as "L" (channels 1) or "RGB" (3); alpha composited on white."""
    if im.mode in _WIDE_MODES:
        im = _eight_bit(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if im.mode not in ("L", "RGB"):  # palette, bilevel, CMYK, YCbCr, ...: through RGB, which Pillow always has
        im = im.convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format Pillow reads"
    text = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc)).strip()
    return (text.splitlines()[0][:200] if text else "") or type(exc).__name__


def decode(blob: bytes, size: int, channels: int, where: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Encoded image -> uint8 (channels, size, size), and its upright (width, height, bands).

    EXIF orientation applied, alpha composited on white, wide greyscale scaled to 8 bits, then a BILINEAR
    resize to the square. Anything Pillow cannot open or decode is a UserError naming `where`.
    """
    if not blob:
        raise UserError(f"{where}: not a readable image (empty file)")
    try:
        with Image.open(io.BytesIO(blob)) as im:
            ImageOps.exif_transpose(im, in_place=True)  # decodes the pixels: truncated data fails here
            original = (im.width, im.height, _bands(im))
            out = _to_mode(im, channels).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's decoders raise a zoo of types on broken data (OSError, SyntaxError, ...)
        raise UserError(f"{where}: not a readable image ({_reason(exc)})") from None
    a = np.asarray(out, dtype=np.uint8)  # (S, S) or (S, S, 3)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, S, S)
    return np.ascontiguousarray(a), original


def _probe(source: bytes | Path) -> tuple[int, int] | None:
    """(longer side, bands) from the header alone; None if unreadable (decoding names it later)."""
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as im:
            return max(im.size), _bands(im)
    except MemoryError:
        raise
    except Exception:
        return None


def _workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return max(1, min(cores or os.cpu_count() or 1, os.cpu_count() or 1))


def _map(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """`fn` over `items` in threads (Pillow and hashlib release the GIL), in chunks, results in order."""
    workers = min(_workers(), len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    step = max(1, min(256, -(-len(items) // (workers * 4))))
    chunks = [items[i:i + step] for i in range(0, len(items), step)]
    with ThreadPoolExecutor(workers) as pool:
        return [r for part in pool.map(lambda chunk: [fn(x) for x in chunk], chunks) for r in part]


# --- frames ---------------------------------------------------------------------------------------

def _frame(pixels: np.ndarray, files: list[str], sizes: np.ndarray, label: str | None = None,
           labels: Sequence[Any] | None = None) -> pd.DataFrame:
    """The prepared columns of `pixels` (N, C, S, S) uint8, `sizes` (N, 3): width, height, bands."""
    blobs = [image.tobytes() for image in pixels]  # each (C, S, S), C-order
    df = pd.DataFrame({PIXELS: pd.Series(blobs, dtype=object), FILE: pd.Series(files, dtype=object),
                       WIDTH: sizes[:, 0].astype(np.int64), HEIGHT: sizes[:, 1].astype(np.int64),
                       BANDS: sizes[:, 2].astype(np.int64),
                       DIGEST: pd.Series([hashlib.sha256(b).hexdigest() for b in blobs], dtype=object)})
    if label is not None:
        df[label] = list(labels) if labels is not None else []
    return df


def to_array(frame: pd.DataFrame, info: dict) -> np.ndarray:
    """The PIXELS column as one writable uint8 array.  # (N, C, S, S)"""
    c, s = int(info["channels"]), int(info["size"])
    blobs = frame[PIXELS].tolist()
    if any(len(b) != c * s * s for b in blobs):
        raise UserError(f"prepared images are not {c}×{s}×{s} ({c * s * s} bytes each) as schema.json says: "
                        "run the prepare stage again")
    if not blobs:
        return np.zeros((0, c, s, s), np.uint8)
    return np.frombuffer(bytearray().join(blobs), np.uint8).reshape(len(blobs), c, s, s)


def _image_info(train: np.ndarray) -> dict:
    """Size, channels and per-channel mean/std of the training pixels / 255, from exact histograms."""
    _, c, s, _ = train.shape
    levels = np.arange(256, dtype=np.float64)
    mean, std = [], []
    for ch in range(c):
        counts = np.bincount(train[:, ch].reshape(-1), minlength=256).astype(np.float64)
        m = float(counts @ levels / counts.sum())
        var = max(float(counts @ (levels * levels) / counts.sum()) - m * m, 0.0)
        mean.append(m / 255.0)
        std.append(max(var ** 0.5 / 255.0, STD_FLOOR))
    return {"size": int(s), "channels": int(c), "mean": mean, "std": std}


def _schema(params: DataParams, classes: tuple, train: np.ndarray) -> Schema:
    return Schema((params.image_column,), params.label_column, classes, image=_image_info(train))


# --- Fashion-MNIST --------------------------------------------------------------------------------

def fashion_mnist_dir() -> Path:
    return Path(os.environ.get(FASHION_ENV) or FASHION_DIR)


def read_idx(path: Path) -> np.ndarray:
    """A gzip idx file of uint8: images (N, rows, cols) (magic 2051) or labels (N,) (magic 2049)."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: not a readable gzip idx file ({_reason(exc)})") from None
    magic = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
    if magic not in (2049, 2051):
        raise UserError(f"{path}: not an idx file of uint8 images or labels (magic {magic}, expected 2051 or 2049)")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: idx header cut short ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise UserError(f"{path}: {len(raw) - header} bytes of data, the idx header promises "
                        f"{'×'.join(map(str, shape))} = {int(np.prod(shape))}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _read_fashion(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = (folder / name for name in FASHION_FILES[split])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"{images_path}: {images.shape} images do not match the {labels.shape} labels of "
                        f"{labels_path.name}")
    if len(labels) and labels.max() >= len(FASHION_CLASSES):
        raise UserError(f"{labels_path}: label {int(labels.max())} is not one of the "
                        f"{len(FASHION_CLASSES)} Fashion-MNIST classes")
    return images, labels


def _resize_grey(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """(N, H, W) greyscale -> (N, C, S, S) as `decode` reads them (a grey image's RGB repeats its one band)."""
    if images.shape[1:] == (size, size):  # the idx array already is the pixels: no Pillow round trip
        out = images[:, None]
    else:
        resize = lambda a: np.asarray(  # noqa: E731
            Image.fromarray(a, "L").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))
        out = np.stack(_map(resize, list(images)))[:, None] if len(images) else np.zeros((0, 1, size, size), np.uint8)
    return np.ascontiguousarray(np.repeat(out, channels, axis=1) if channels == 3 else out)


def fashion_mnist_splits(params: DataParams) -> Splits:
    """A seeded, class-balanced draw of `per_class` training images per class; `transfer_size` of the
    remaining training images, unlabelled; the official 10,000 test images."""
    folder = fashion_mnist_dir()
    missing = [n for names in FASHION_FILES.values() for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{folder}: Fashion-MNIST file(s) {missing} not found; apt-get install "
                        f"dataset-fashion-mnist (or point {FASHION_ENV} at a directory holding them)")
    images, labels = _read_fashion(folder, "train")
    test_images, test_labels = _read_fashion(folder, "test")
    rng = np.random.default_rng(params.seed)
    chosen = [rng.permutation(np.flatnonzero(labels == k))[:params.per_class] for k in range(len(FASHION_CLASSES))]
    train_idx = np.sort(np.concatenate(chosen))
    rest = np.setdiff1d(np.arange(len(labels)), train_idx)
    transfer_idx = np.sort(rng.permutation(rest)[:params.transfer_size])
    size, channels = params.image_size or FASHION_SIZE, params.channels or 1
    names = np.array(FASHION_CLASSES, dtype=object)

    def split(imgs: np.ndarray, idx: np.ndarray, file: str, lab: np.ndarray | None) -> tuple[pd.DataFrame, np.ndarray]:
        pixels = _resize_grey(imgs[idx], size, channels)
        sizes = np.tile(np.array([imgs.shape[2], imgs.shape[1], 1]), (len(idx), 1))
        files = [f"{file}[{i}]" for i in idx.tolist()]
        if lab is None:
            return _frame(pixels, files, sizes), pixels
        return _frame(pixels, files, sizes, params.label_column, names[lab[idx]]), pixels

    train, train_pixels = split(images, train_idx, FASHION_FILES["train"][0], labels)
    test, _ = split(test_images, np.arange(len(test_labels)), FASHION_FILES["test"][0], test_labels)
    transfer, _ = split(images, transfer_idx, FASHION_FILES["train"][0], None)
    return Splits(train, test, transfer, _schema(params, FASHION_CLASSES, train_pixels))


def load_source(params: DataParams, root: Path) -> Splits:
    if params.source == "fashion_mnist":
        return fashion_mnist_splits(params)
    from kd_core.tasks.image import byo  # it builds on this module's decoding and frames

    if params.source == "folder":
        return byo.folder_splits(params, root)
    if params.source == "parquet":
        return byo.parquet_splits(params, root)
    raise UserError(f"data.source {params.source!r}: task image reads "
                    f"{' or '.join((*BUILTIN_SOURCES, *FILE_SOURCES))}")
