"""The image task's sources (kd_core.tasks.image.data): Fashion-MNIST idx files, class folders and parquet
tables, decoded into prepared frames. Every image is made here with Pillow and numpy; the one test that
reads the real Debian Fashion-MNIST files skips where the package is not installed."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from kd_core.config import DataParams
from kd_core.data import read_prepared, write_prepared
from kd_core.errors import UserError
from kd_core.tasks.image.data import (
    BANDS,
    DIGEST,
    FASHION_CLASSES,
    FASHION_DIR,
    FASHION_ENV,
    FILE,
    HEIGHT,
    PIXELS,
    WIDTH,
    decode,
    load_source,
    read_idx,
    to_array,
)

COLUMNS = [PIXELS, FILE, WIDTH, HEIGHT, BANDS, DIGEST]


def encoded(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def save(path: Path, img: Image.Image | bytes, fmt: str = "PNG", **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(img if isinstance(img, bytes) else encoded(img, fmt, **options))
    return path


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    shape = (height, width) if mode == "L" else (height, width, len(mode))
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


def image_params(source: str, **kw) -> DataParams:
    files = {"train": "train", "test": "test"} if source == "folder" else {}
    if source == "parquet":
        files = {"train": "train.parquet", "test": "test.parquet"}
    return DataParams(source=source, **(files | kw))


# --- Fashion-MNIST ----------------------------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    return path


@pytest.fixture
def fake_fashion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """100 training images (10 per class, shuffled) and 20 test images of noise in the idx format."""
    rng = np.random.default_rng(0)
    arrays = {"train": rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
              "train_labels": rng.permutation(np.repeat(np.arange(10), 10)),
              "test": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), "test_labels": np.arange(20) % 10}
    folder = tmp_path / "fashion"
    folder.mkdir()
    for prefix, key in (("train", "train"), ("t10k", "test")):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", arrays[key])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", arrays[f"{key}_labels"])
    monkeypatch.setenv(FASHION_ENV, str(folder))
    return arrays


def indices(frame: pd.DataFrame) -> list[int]:
    return [int(f.split("[")[1].rstrip("]")) for f in frame[FILE]]


def test_read_idx_and_its_errors(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / "i.gz", images)), images)
    assert np.array_equal(read_idx(write_idx(tmp_path / "l.gz", np.array([3, 1]))), [3, 1])
    with pytest.raises(UserError, match=r"bad\.gz: not an idx file .*magic 1234"):
        read_idx(write_idx(tmp_path / "bad.gz", np.array([1, 2]), magic=1234))
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(struct.pack(">II", 2049, 5) + b"\x01\x02"))
    with pytest.raises(UserError, match=r"short\.gz: 2 bytes of data, the idx header promises 5"):
        read_idx(short)
    (tmp_path / "plain.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=r"plain\.gz: not a readable gzip idx file"):
        read_idx(tmp_path / "plain.gz")


def test_fashion_balanced_draw(fake_fashion: dict[str, np.ndarray], tmp_path: Path) -> None:
    params = image_params("fashion_mnist", per_class=3, transfer_size=20, seed=1)
    splits = load_source(params, tmp_path)
    train, test, transfer = splits.train, splits.test, splits.transfer
    assert list(train.columns) == [*COLUMNS, "label"] and list(transfer.columns) == COLUMNS
    assert splits.schema.classes == FASHION_CLASSES and splits.schema.features == ("image",)
    assert train["label"].value_counts().to_dict() == dict.fromkeys(FASHION_CLASSES, 3)
    idx = indices(train)
    assert idx == sorted(idx)
    assert list(train["label"]) == [FASHION_CLASSES[k] for k in fake_fashion["train_labels"][idx]]
    assert list(train[PIXELS]) == [fake_fashion["train"][i].tobytes() for i in idx]
    assert train[FILE].iloc[0].startswith("train-images-idx3-ubyte.gz[")
    assert (train[[WIDTH, HEIGHT, BANDS]].to_numpy() == [28, 28, 1]).all()
    assert len(transfer) == 20 and not set(indices(transfer)) & set(idx)
    assert len(test) == 20 and list(test[FILE])[:2] == ["t10k-images-idx3-ubyte.gz[0]", "t10k-images-idx3-ubyte.gz[1]"]
    assert list(test["label"]) == [FASHION_CLASSES[k] for k in fake_fashion["test_labels"]]
    info = splits.schema.image_info
    assert (info["size"], info["channels"]) == (28, 1)
    assert info["mean"][0] == pytest.approx(fake_fashion["train"][idx].mean() / 255)
    assert info["std"][0] == pytest.approx(fake_fashion["train"][idx].std() / 255)

    again = load_source(params, tmp_path)
    assert indices(again.train) == idx and indices(again.transfer) == indices(transfer)
    assert indices(load_source(params.model_copy(update={"seed": 2}), tmp_path).train) != idx
    rest = load_source(params.model_copy(update={"transfer_size": 1000}), tmp_path)
    assert len(rest.transfer) == 70  # every training image not drawn, no more
    everything = load_source(params.model_copy(update={"per_class": None}), tmp_path)
    assert len(everything.train) == 100 and len(everything.transfer) == 0
    assert list(everything.transfer.columns) == COLUMNS


@pytest.mark.parametrize(("size", "channels"), [(28, 1), (28, 3), (32, 1), (20, 3)])
def test_fashion_pixels_equal_decoding_the_image(fake_fashion: dict[str, np.ndarray], tmp_path: Path, size: int,
                                                 channels: int) -> None:
    """The fast path (size 28, no Pillow) and the resize path read an image as `decode` reads its PNG."""
    params = image_params("fashion_mnist", per_class=2, transfer_size=3, image_size=size, channels=channels)
    splits = load_source(params, tmp_path)
    pixels = to_array(splits.train, splits.schema.image_info)
    assert pixels.shape == (20, channels, size, size)
    for row, i in enumerate(indices(splits.train)[:5]):
        png = encoded(Image.fromarray(fake_fashion["train"][i], "L"))
        expected, original = decode(png, size, channels, "x")
        assert np.array_equal(pixels[row], expected) and original == (28, 28, 1)
    assert len(splits.test[PIXELS].iloc[0]) == channels * size * size


def test_fashion_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FASHION_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"nowhere: Fashion-MNIST file.*apt-get install dataset-fashion-mnist"):
        load_source(image_params("fashion_mnist"), tmp_path)


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} not found: apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FASHION_ENV, raising=False)
    splits = load_source(image_params("fashion_mnist", per_class=300, transfer_size=1000), tmp_path)
    assert (len(splits.train), len(splits.test), len(splits.transfer)) == (3000, 10_000, 1000)
    assert splits.test["label"].value_counts().to_dict() == dict.fromkeys(FASHION_CLASSES, 1000)
    assert splits.schema.image_info["mean"][0] == pytest.approx(0.286, abs=0.01)  # the published statistics
    assert splits.schema.image_info["std"][0] == pytest.approx(0.353, abs=0.01)


# --- folder -----------------------------------------------------------------------------------------

@pytest.fixture
def folder_tree(tmp_path: Path) -> Path:
    """Two classes: RGB cats (one a nested JPEG), greyscale dogs; hidden files and folders beside them."""
    save(tmp_path / "train/cat/a.png", noise(20, 30, seed=1))
    save(tmp_path / "train/cat/sub/deeper/b.jpg", noise(40, 20, seed=2), "JPEG")
    save(tmp_path / "train/dog/c.png", noise(30, 30, "L", seed=3))
    save(tmp_path / "train/dog/d.png", noise(50, 10, "L", seed=4))
    save(tmp_path / "train/cat/.hidden.png", b"junk")
    save(tmp_path / "train/.DS_Store", b"junk")
    save(tmp_path / "train/.cache/x.txt", b"junk")
    save(tmp_path / "train/cat/.thumbs/t.txt", b"junk")
    save(tmp_path / "test/cat/e.png", noise(20, 20, seed=5))
    save(tmp_path / "test/dog/f.png", noise(20, 20, "L", seed=6))
    save(tmp_path / "unlabelled/x/y/g.png", noise(25, 25, seed=7))
    save(tmp_path / "unlabelled/h.bmp", noise(25, 25, seed=8), "BMP")
    return tmp_path


def test_folder_source(folder_tree: Path) -> None:
    splits = load_source(image_params("folder", transfer="unlabelled"), folder_tree)
    train, transfer = splits.train, splits.transfer
    assert splits.schema.classes == ("cat", "dog")
    assert list(train[FILE]) == ["cat/a.png", "cat/sub/deeper/b.jpg", "dog/c.png", "dog/d.png"]
    assert list(train["label"]) == ["cat", "cat", "dog", "dog"]
    assert train[[WIDTH, HEIGHT, BANDS]].to_numpy().tolist() == [[20, 30, 3], [40, 20, 3], [30, 30, 1], [50, 10, 1]]
    info = splits.schema.image_info
    assert (info["size"], info["channels"]) == (35, 3)  # median of the longer sides 30, 40, 30, 50; RGB and grey
    assert all(len(b) == 3 * 35 * 35 for b in train[PIXELS])
    pixels = to_array(train, info)
    expected, _ = decode((folder_tree / "train/dog/c.png").read_bytes(), 35, 3, "x")
    assert np.array_equal(pixels[2], expected)
    assert np.array_equal(pixels[2, 0], pixels[2, 1]) and np.array_equal(pixels[2, 0], pixels[2, 2])
    assert list(train[DIGEST]) == [hashlib.sha256(b).hexdigest() for b in train[PIXELS]]
    assert list(splits.test[FILE]) == ["cat/e.png", "dog/f.png"] and list(splits.test["label"]) == ["cat", "dog"]
    assert list(transfer.columns) == COLUMNS and list(transfer[FILE]) == ["h.bmp", "x/y/g.png"]
    no_transfer = load_source(image_params("folder"), folder_tree)
    assert len(no_transfer.transfer) == 0 and list(no_transfer.transfer.columns) == COLUMNS


@pytest.mark.parametrize(("sides", "expected"), [((1, 4, 6), 8), ((300, 260, 250), 224), ((9, 12, 16, 40), 14)])
def test_folder_size_rule_and_greyscale(tmp_path: Path, sides: tuple[int, ...], expected: int) -> None:
    """image_size null: the median longer side within [8, 224]; all-greyscale (L, LA) sources read 1 channel."""
    for i, side in enumerate(sides):
        img = noise(side, max(1, side // 2), "L", seed=i)
        save(tmp_path / f"train/{i % 2}/{i}.png", img.convert("LA") if i == 1 else img)
    save(tmp_path / "test/0/t.png", noise(5, 5, "L"))
    splits = load_source(image_params("folder"), tmp_path)
    assert (splits.schema.image_info["size"], splits.schema.image_info["channels"]) == (expected, 1)
    assert splits.schema.classes == ("0", "1")
    assert all(len(b) == expected * expected for b in splits.train[PIXELS])


def test_tiny_image_accepted_and_upscaled(tmp_path: Path) -> None:
    save(tmp_path / "train/a/one.png", Image.new("RGB", (1, 1), (10, 20, 30)))
    save(tmp_path / "test/a/one.png", Image.new("RGB", (1, 1), (10, 20, 30)))
    splits = load_source(image_params("folder", image_size=16), tmp_path)
    assert splits.train[[WIDTH, HEIGHT, BANDS]].to_numpy().tolist() == [[1, 1, 3]]
    pixels = to_array(splits.train, splits.schema.image_info)
    assert pixels.shape == (1, 3, 16, 16) and (pixels[0, :, :, :].reshape(3, -1).T == [10, 20, 30]).all()
    assert splits.schema.image_info["std"] == [1e-3] * 3  # a constant image: the floor, never zero


def test_identical_files_share_a_digest(tmp_path: Path) -> None:
    img = noise(12, 12, seed=3)
    save(tmp_path / "train/a/x.png", img)
    save(tmp_path / "train/b/copy.png", img)
    save(tmp_path / "train/b/other.png", noise(12, 12, seed=4))
    save(tmp_path / "test/a/as-jpeg-name.jpg", img)  # a PNG named .jpg: Pillow reads by content
    splits = load_source(image_params("folder"), tmp_path)
    digests = list(splits.train[DIGEST])
    assert digests[0] == digests[1] != digests[2]
    assert splits.test[DIGEST].iloc[0] == digests[0]


def _classes(tmp_path: Path) -> None:
    """A valid two-class train and test folder to break."""
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            save(tmp_path / f"{split}/{c}/ok.png", noise(10, 10, seed=len(c)))


def test_unreadable_images_are_all_counted(tmp_path: Path) -> None:
    _classes(tmp_path)
    png = encoded(noise(40, 40, seed=9))
    save(tmp_path / "train/cat/broken.png", png[: len(png) // 2])
    save(tmp_path / "train/dog/empty.png", b"")
    save(tmp_path / "test/dog/text.png", b"just some words, no image here\n")
    with pytest.raises(UserError) as err:
        load_source(image_params("folder"), tmp_path)
    message = str(err.value)
    assert message.startswith(str(tmp_path / "train/cat/broken.png") + ": not a readable image (")
    assert message.endswith("; 3 unreadable images in all") and "\n" not in message


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("empty.png", b"", "empty file"),
    ("words.png", b"hello, not pixels", "not an image format Pillow reads"),
])
def test_one_unreadable_image(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    _classes(tmp_path)
    save(tmp_path / "train/cat" / name, content)
    with pytest.raises(UserError, match=f"cat/{name}: not a readable image \\({reason}\\)$"):
        load_source(image_params("folder"), tmp_path)


def test_non_image_files_refused(tmp_path: Path) -> None:
    _classes(tmp_path)
    save(tmp_path / "train/cat/notes.txt", b"x")
    save(tmp_path / "train/dog/sub/README", b"x")
    with pytest.raises(UserError, match=r"cat/notes\.txt: not an image file by its extension .*2 such file\(s\)"):
        load_source(image_params("folder"), tmp_path)


def test_folder_layout_errors(tmp_path: Path) -> None:
    _classes(tmp_path)
    (tmp_path / "train/bird/.only-hidden").mkdir(parents=True)
    with pytest.raises(UserError, match=r"train/bird: class folder 'bird' has no images"):
        load_source(image_params("folder"), tmp_path)
    (tmp_path / "train/bird/.only-hidden").rmdir()
    (tmp_path / "train/bird").rmdir()
    save(tmp_path / "test/fish/f.png", noise(10, 10))
    with pytest.raises(UserError, match=r"test/fish: class 'fish' is not one of the training classes"):
        load_source(image_params("folder"), tmp_path)
    (tmp_path / "test/fish/f.png").unlink()
    save(tmp_path / "train/loose.png", noise(10, 10))
    with pytest.raises(UserError, match=r"train/loose\.png: outside any class folder"):
        load_source(image_params("folder"), tmp_path)
    with pytest.raises(UserError, match=r"data.train .*nowhere: directory not found"):
        load_source(image_params("folder", train="nowhere"), tmp_path)


# --- decoding edge cases ----------------------------------------------------------------------------

def test_alpha_is_composited_on_white() -> None:
    img = Image.new("RGBA", (2, 1), (0, 0, 255, 255))
    img.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    pixels, original = decode(encoded(img), 2, 3, "x")
    assert original == (2, 1, 4)
    assert pixels[:, 0, 0].tolist() == [255, 255, 255] and pixels[:, 0, 1].tolist() == [0, 0, 255]
    grey, _ = decode(encoded(img.convert("LA")), 2, 1, "x")
    assert grey[0, 0, 0] == 255


def test_palette_images() -> None:
    img = Image.new("P", (2, 2), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((1, 1), 1)
    pixels, original = decode(encoded(img), 2, 3, "x")
    assert original == (2, 2, 3)
    assert pixels[:, 0, 0].tolist() == [255, 0, 0] and pixels[:, 1, 1].tolist() == [0, 0, 255]
    see_through, original = decode(encoded(img, transparency=0), 2, 3, "x")
    assert original == (2, 2, 4)
    assert see_through[:, 0, 0].tolist() == [255, 255, 255] and see_through[:, 1, 1].tolist() == [0, 0, 255]


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    img = Image.fromarray(np.array([[0, 32896], [65535, 257]], dtype=np.uint16))
    png = encoded(img)
    assert Image.open(io.BytesIO(png)).mode == "I;16"
    pixels, original = decode(png, 2, 1, "x")
    assert original == (2, 2, 1) and pixels[0].tolist() == [[0, 128], [255, 1]]
    rgb, _ = decode(png, 2, 3, "x")
    assert (rgb == pixels).all()


def test_exif_rotation_is_applied() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # red left half as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: the left half ends on top
    pixels, original = decode(encoded(img, "JPEG", exif=exif.tobytes(), quality=95), 8, 3, "x")
    assert original == (20, 40, 3)
    top, bottom = pixels[:, 1, 4].astype(int), pixels[:, 6, 4].astype(int)
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_decode_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=r"^here: not a readable image \(empty file\)$"):
        decode(b"", 8, 1, "here")
    jpeg = encoded(noise(64, 64, seed=2), "JPEG")
    with pytest.raises(UserError, match=r"^here: not a readable image \(.*truncated"):
        decode(jpeg[: len(jpeg) // 3], 8, 1, "here")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UserError, match=r"^here: not a readable image \(.*decompression bomb"):
        decode(encoded(noise(30, 30)), 8, 1, "here")


# --- parquet ----------------------------------------------------------------------------------------

def _table(images: list, labels: list | None, column: str = "image") -> pd.DataFrame:
    df = pd.DataFrame({column: images})
    return df if labels is None else df.assign(label=labels)


def test_parquet_bytes_column(tmp_path: Path) -> None:
    imgs = [encoded(noise(16, 16, "L", seed=i)) for i in range(6)]
    _table(imgs[:4], [2, 0, 2, 1], "img").to_parquet(tmp_path / "train.parquet")
    _table(imgs[4:], [0, 1], "img").to_parquet(tmp_path / "test.parquet")
    _table([imgs[0]], None, "img").to_parquet(tmp_path / "transfer.parquet")
    splits = load_source(image_params("parquet", image_column="img", transfer="transfer.parquet"), tmp_path)
    assert splits.schema.classes == (0, 1, 2) and splits.schema.features == ("img",)
    assert list(splits.train["label"]) == [2, 0, 2, 1]
    assert list(splits.train[FILE]) == [f"train.parquet row {i}" for i in range(4)]
    assert (splits.schema.image_info["size"], splits.schema.image_info["channels"]) == (16, 1)
    assert list(splits.transfer.columns) == COLUMNS and splits.transfer[DIGEST][0] == splits.train[DIGEST][0]


def test_parquet_hugging_face_image_struct(tmp_path: Path) -> None:
    rows = [{"bytes": encoded(noise(10, 12, seed=i)), "path": f"{i}.png"} for i in range(3)]
    _table(rows[:2], ["shoe", "bag"]).to_parquet(tmp_path / "train.parquet")
    _table(rows[2:], ["bag"]).to_parquet(tmp_path / "test.parquet")
    splits = load_source(image_params("parquet"), tmp_path)
    assert splits.schema.classes == ("bag", "shoe")
    assert (splits.schema.image_info["size"], splits.schema.image_info["channels"]) == (12, 3)
    assert splits.train[[WIDTH, HEIGHT, BANDS]].to_numpy().tolist() == [[10, 12, 3], [10, 12, 3]]


@pytest.mark.parametrize(("train", "match"), [
    (pd.DataFrame({"picture": [b"x"], "label": [0]}), r"train\.parquet: image column 'image' not found"),
    (pd.DataFrame({"image": [b"x"]}), r"train\.parquet: label column 'label' not found"),
    (_table([b"x", None], [0, 1]), r"train\.parquet: column 'image' row 1: null, not encoded image bytes"),
    (_table(["a.png"], [0]), r"train\.parquet: column 'image' row 0: a str value, not encoded image bytes"),
    (_table([b"x", b"y"], [0, None]), r"train\.parquet: column 'label' row 1: null label"),
    (_table([{"bytes": None, "path": "/data/a.png"}], [0]),
     r"row 0: an image struct without bytes \(only the path '/data/a.png'\)"),
    (_table([b"x", b"not an image"], [0, 1]), r"train\.parquet row 0: not a readable image .*2 unreadable images"),
    (_table([], []), r"train\.parquet: has 0 rows"),
])
def test_parquet_errors(tmp_path: Path, train: pd.DataFrame, match: str) -> None:
    train.to_parquet(tmp_path / "train.parquet")
    _table([encoded(noise(8, 8))], [0]).to_parquet(tmp_path / "test.parquet")
    with pytest.raises(UserError, match=match):
        load_source(image_params("parquet"), tmp_path)


# --- prepared frames --------------------------------------------------------------------------------

def test_prepared_round_trip_and_to_array(folder_tree: Path, tmp_path: Path) -> None:
    splits = load_source(image_params("folder", image_size=12), folder_tree)
    write_prepared(splits, tmp_path / "prepared")
    back = read_prepared(tmp_path / "prepared")
    info = back.schema.image_info
    assert info == splits.schema.image_info and info["channels"] == 3
    pixels = to_array(back.train, info)
    assert pixels.shape == (4, 3, 12, 12) and pixels.dtype == np.uint8 and pixels.flags.writeable
    assert np.array_equal(pixels, to_array(splits.train, info))
    floats = pixels.astype(np.float64) / 255
    assert info["mean"] == pytest.approx(floats.mean(axis=(0, 2, 3)).tolist())
    assert info["std"] == pytest.approx(floats.std(axis=(0, 2, 3)).tolist())
    assert to_array(back.transfer, info).shape == (0, 3, 12, 12)
    with pytest.raises(UserError, match="not 1×12×12"):
        to_array(back.train, info | {"channels": 1})
