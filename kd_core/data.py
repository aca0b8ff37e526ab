"""Data sources and prepared splits.

`prepare` turns a source (built-in MNIST-1D, or the user's parquet tables) into three parquet
splits with one shared schema, plus `schema.json` holding the feature order and the class list that
travel with every model. Reading failures become one-line UserErrors naming the file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kd_core.config import DataParams
from kd_core.errors import UserError

SPLITS = ("train", "test", "transfer")
SCHEMA_FILE = "schema.json"
MNIST1D_LABEL = "label"


@dataclass(frozen=True)
class Schema:
    """What a model needs to serve raw rows: feature order, label column and class names."""

    features: tuple[str, ...]  # task text: the one text column
    label_column: str
    classes: tuple  # class names (ints or strings) in logit order
    # task text: how documents become token ids (kd_core.tasks.text.data.TextInfo as a dict); None for tables
    text: dict | None = None
    # task image: how an image becomes model inputs (side, channels, normalisation); None for the others
    image: dict | None = None

    @property
    def text_info(self) -> dict:
        """`text` of a schema that has one (tasks text and lm)."""
        assert self.text is not None, "a table's schema has no text info"
        return self.text

    @property
    def image_info(self) -> dict:
        """`image` of a schema that has one (task image)."""
        assert self.image is not None, "this schema has no image info"
        return self.image

    def to_json(self) -> dict:
        out = {"features": list(self.features), "label_column": self.label_column, "classes": list(self.classes)}
        return out | {k: v for k, v in (("text", self.text), ("image", self.image)) if v is not None}

    @classmethod
    def from_json(cls, obj: dict) -> Schema:
        return cls(tuple(obj["features"]), obj["label_column"], tuple(obj["classes"]), obj.get("text"),
                   obj.get("image"))


@dataclass(frozen=True)
class Splits:
    train: pd.DataFrame
    test: pd.DataFrame
    transfer: pd.DataFrame
    schema: Schema


# --- built-in source ------------------------------------------------------------------------------

def _mnist1d(seed: int, num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset  # generates offline; get_dataset downloads

    args = get_dataset_args()
    args.seed, args.num_samples = seed, num_samples
    ds = make_dataset(args)
    return ds["x"], ds["y"], ds["x_test"], ds["y_test"]


def _frame(x: np.ndarray, y: np.ndarray | None) -> pd.DataFrame:
    cols = {f"x{i:02d}": x[:, i].astype(np.float32) for i in range(x.shape[1])}
    if y is not None:
        cols[MNIST1D_LABEL] = y.astype(np.int64)
    return pd.DataFrame(cols)


def mnist1d_splits(params: DataParams) -> Splits:
    """The standard 4000/1000 MNIST-1D split plus `transfer_size` unlabelled rows from other seeds."""
    x, y, xt, yt = _mnist1d(params.seed, 5000)
    transfer, seed = [], params.seed + 1
    remaining = params.transfer_size
    while remaining > 0:  # other seeds draw new noise, shifts and shears of the same templates
        n = min(remaining, 25_000)
        a, _, b, _ = _mnist1d(seed, n)
        transfer.append(np.concatenate([a, b])[:n])
        remaining -= n
        seed += 1
    xu = np.concatenate(transfer) if transfer else np.zeros((0, x.shape[1]), np.float32)
    train, test = _frame(x, y), _frame(xt, yt)
    features = tuple(c for c in train.columns if c != MNIST1D_LABEL)
    schema = Schema(features, MNIST1D_LABEL, tuple(int(c) for c in np.unique(y)))
    return Splits(train, test, _frame(xu, None), schema)


# --- bring your own -------------------------------------------------------------------------------

def read_parquet(path: Path, what: str) -> pd.DataFrame:
    """Read a user table, turning every way it can be broken into one line naming the file."""
    if not path.exists():
        raise UserError(f"{what} file {path} not found")
    if path.is_dir() or path.stat().st_size == 0:
        raise UserError(f"{what} file {path} is empty or not a file")
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise UserError(f"{what} file {path} is not a readable parquet table: "
                        f"{str(exc).splitlines()[0]}") from None


def _check_features(df: pd.DataFrame, features: tuple[str, ...], path: Path) -> None:
    missing = [c for c in features if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing feature column(s) {missing[:5]} ({len(missing)} in all)")
    for col in features:
        if not (pd.api.types.is_numeric_dtype(df[col]) and not pd.api.types.is_bool_dtype(df[col])):
            raise UserError(f"{path}: feature column {col!r} is not numeric (dtype {df[col].dtype}); "
                            "encode it or leave it out with data.feature_columns")


def _check_same_columns(train: pd.DataFrame, test: pd.DataFrame, train_path: Path, test_path: Path) -> None:
    """Features are "every column but the label": then both tables must have the same columns, both ways.

    A column only the test table has would otherwise be dropped silently, and the model registered
    on fewer features than the user's data holds.
    """
    only_train = [c for c in train.columns if c not in test.columns]
    if only_train:
        raise UserError(f"{test_path}: missing column(s) {only_train[:5]} ({len(only_train)} in all) of the training "
                        f"table {train_path}")
    only_test = [c for c in test.columns if c not in train.columns]
    if only_test:
        raise UserError(f"{test_path}: column(s) {only_test[:5]} ({len(only_test)} in all) are not in the training "
                        f"table {train_path}; add them there, or list the features in data.feature_columns")


def sorted_classes(labels: pd.Series) -> tuple:
    values = labels.dropna().unique().tolist()
    try:
        return tuple(sorted(v.item() if hasattr(v, "item") else v for v in values))
    except TypeError:  # mixed types: order by their text so the class order is still deterministic
        return tuple(sorted(values, key=str))


def parquet_splits(params: DataParams, root: Path) -> Splits:
    """Read the user's tables; features are every non-label column unless listed explicitly."""
    label = params.label_column
    assert params.train and params.test  # config: data.source parquet needs data.train and data.test
    paths = {"train": root / params.train, "test": root / params.test}
    train = read_parquet(paths["train"], "data.train")
    test = read_parquet(paths["test"], "data.test")
    for name, df in (("train", train), ("test", test)):
        if label not in df.columns:
            raise UserError(f"{paths[name]}: label column {label!r} not found "
                            f"(columns: {list(df.columns)[:8]}); set data.label_column")
    features = params.feature_columns or tuple(c for c in train.columns if c != label)
    if params.feature_columns is None:
        _check_same_columns(train, test, paths["train"], paths["test"])
    if not features:
        raise UserError(f"{paths['train']}: no feature columns besides the label {label!r}")
    for name, df in (("train", train), ("test", test)):
        _check_features(df, features, paths[name])
    if len(train) == 0:
        raise UserError(f"{paths['train']}: has 0 rows")
    if len(test) == 0:
        raise UserError(f"{paths['test']}: has 0 rows")
    if params.transfer:
        transfer_path = root / params.transfer
        transfer = read_parquet(transfer_path, "data.transfer")
        _check_features(transfer, features, transfer_path)
        transfer = transfer[list(features)]
    else:
        transfer = train[list(features)].iloc[:0]
    cols = [*features, label]
    schema = Schema(tuple(features), label, sorted_classes(train[label]))
    return Splits(train[cols].reset_index(drop=True), test[cols].reset_index(drop=True),
                  transfer.reset_index(drop=True), schema)


def load_source(params: DataParams, root: Path) -> Splits:
    return mnist1d_splits(params) if params.source == "mnist1d" else parquet_splits(params, root)


# --- prepared splits ------------------------------------------------------------------------------

TOKENIZER_FILE = "tokenizer.json"  # tasks that read tokens: the teacher's tokenizer, beside the splits
TOKENS = "kd_tokens"  # prepared column of tasks that read documents: a document's untruncated token count


def write_prepared(splits: Splits, out: Path, tokenizer: Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
    for name in SPLITS:
        getattr(splits, name).to_parquet(out / f"{name}.parquet", index=False)
    (out / SCHEMA_FILE).write_text(json.dumps(splits.schema.to_json(), indent=2))


def read_prepared(prepared: Path) -> Splits:
    schema_path = prepared / SCHEMA_FILE
    if not schema_path.exists():
        raise UserError(f"{schema_path} not found: run the prepare stage first")
    schema = Schema.from_json(json.loads(schema_path.read_text()))
    frames = {s: pd.read_parquet(prepared / f"{s}.parquet") for s in SPLITS}
    return Splits(frames["train"], frames["test"], frames["transfer"], schema)


def data_fingerprint(prepared: Path) -> str:
    """sha256 over the prepared files: identifies exactly the rows a teacher and student saw."""
    h = hashlib.sha256()
    extra = [TOKENIZER_FILE] if (prepared / TOKENIZER_FILE).exists() else []  # text: ids depend on it
    for name in [*(f"{s}.parquet" for s in SPLITS), SCHEMA_FILE, *extra]:
        h.update(name.encode())
        h.update(hashlib.sha256((prepared / name).read_bytes()).digest())
    return h.hexdigest()


def features_array(df: pd.DataFrame, schema: Schema) -> np.ndarray:
    """Feature matrix in the schema's order as float32, the dtype every model consumes.  # (N, F)"""
    return df[list(schema.features)].to_numpy(dtype=np.float32, copy=True)


def label_indices(df: pd.DataFrame, schema: Schema) -> np.ndarray:
    """Labels as indices into schema.classes; a label outside the classes raises.  # (N,)"""
    lookup = {c: i for i, c in enumerate(schema.classes)}
    labels = df[schema.label_column].tolist()
    try:
        return np.fromiter((lookup[v] for v in labels), dtype=np.int64, count=len(labels))
    except KeyError as exc:
        raise UserError(f"label {exc.args[0]!r} is not one of the training classes") from None
