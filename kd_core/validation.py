"""Great Expectations suites for the prepared splits: nothing is trained on data that failed them.

Every check is a real GX expectation run on an in-memory batch of an ephemeral context, so GX writes
nothing but the result files we ask for. Each failed expectation becomes one readable line naming
the split's file, the column and how many rows are bad; the raw GX results are kept as evidence.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
from great_expectations.core import ExpectationSuiteValidationResult, ExpectationValidationResult
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.expectations.expectation import Expectation

from kd_core.config import ValidationParams
from kd_core.data import SPLITS, TOKENS, Schema, Splits

# Every split is cast to float32 for the models (data.features_array), so any numeric dtype agrees
# with any other; bool is left out on purpose, as data.py rejects it as a feature.
NUMERIC_TYPES = (
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
    "Int8Dtype", "Int16Dtype", "Int32Dtype", "Int64Dtype",
    "UInt8Dtype", "UInt16Dtype", "UInt32Dtype", "UInt64Dtype", "Float32Dtype", "Float64Dtype",
)
# NaN counts as a null (the null check finds it), so "finite" only has ±Inf left to exclude.
_INFINITIES = [float("inf"), float("-inf")]
CLASS_COUNTS = "train_class_counts"  # derived frame (class, rows) that carries the per-class check
SUMMARY_FILE = "summary.json"
_EXAMPLES = 3  # offending values quoted in a message
_SUMMARY: dict[str, Any] = {"result_format": "SUMMARY"}
# COMPLETE with the class column, so a failure can name the classes that are short of rows
_CLASS_FORMAT: dict[str, Any] = {"result_format": "COMPLETE", "unexpected_index_column_names": ["class"]}


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of all suites; `failures` holds one line per failed expectation."""

    success: bool
    failures: tuple[str, ...]
    statistics: dict[str, dict] = field(default_factory=dict)  # per split: rows, columns, expectations…

    def to_json(self) -> dict:
        return {"success": self.success, "failures": list(self.failures), "splits": self.statistics}


# --- suites -----------------------------------------------------------------------------------------

def _feature_expectations(df: pd.DataFrame, features: list[str]) -> list[Expectation]:
    """Type, null and finiteness per feature; a column that is absent is reported by the schema check."""
    out: list[Expectation] = []
    for col in (c for c in features if c in df.columns):
        out.append(gxe.ExpectColumnValuesToBeInTypeList(column=col, type_list=list(NUMERIC_TYPES)))
        out.append(gxe.ExpectColumnValuesToNotBeNull(column=col))
        # a set test is vectorised in pandas; a between-range maps a Python function over every row
        out.append(gxe.ExpectColumnValuesToNotBeInSet(column=col, value_set=_INFINITIES))
    return out


def _duplicate_expectation(df: pd.DataFrame, features: list[str], max_frac: float) -> list[Expectation]:
    """Rows whose features repeat another row's; GX counts every row of a repeated group."""
    present = [c for c in features if c in df.columns]
    mostly = 1.0 - max_frac
    if len(present) >= 2:
        return [gxe.ExpectCompoundColumnsToBeUnique(column_list=present, mostly=mostly)]
    if present:  # the compound expectation needs two columns
        return [gxe.ExpectColumnValuesToBeUnique(column=present[0], mostly=mostly)]
    return []


LENGTH_QUANTILES = (0.5, 0.9, 0.99)  # reported for every text split


def document_expectations(df: pd.DataFrame, col: str, max_length: int | None,
                       params: ValidationParams) -> list[Expectation]:
    """Documents: text, present, not blank, not too often truncated (`max_length`; None: documents are
    packed, never truncated), not repeated; lengths reported."""
    if col not in df.columns:
        return []
    out: list[Expectation] = [
        gxe.ExpectColumnValuesToNotBeNull(column=col),
        gxe.ExpectColumnValuesToBeOfType(column=col, type_="str", meta={"check": "text_type"}),
        gxe.ExpectColumnValuesToMatchRegex(column=col, regex=r"\S", meta={"check": "blank_text"}),
        gxe.ExpectColumnValuesToBeUnique(column=col, mostly=1.0 - params.max_duplicate_frac,
                                         meta={"check": "duplicate_text"})]
    if TOKENS in df.columns and max_length is not None:
        out.append(gxe.ExpectColumnValuesToBeBetween(column=TOKENS, max_value=max_length,
                                                     mostly=1.0 - params.max_truncated_frac,
                                                     meta={"check": "truncated", "max_length": max_length}))
    if TOKENS in df.columns:
        out += [gxe.ExpectColumnQuantileValuesToBeBetween(
                    column=TOKENS, quantile_ranges={"quantiles": list(LENGTH_QUANTILES),
                                                    "value_ranges": [[0, None]] * len(LENGTH_QUANTILES)})]
    return out


def split_expectations(name: str, splits: Splits, params: ValidationParams) -> list[Expectation]:
    """A classifier's suite for one split: schema, types, nulls, finite values (tables) or documents
    (token ids beside the text), labels and duplicates."""
    df, schema = getattr(splits, name), splits.schema
    features, label = list(schema.features), schema.label_column
    inputs = [c for c in df.columns if c not in (*features, label)] if schema.text else []  # ids, lengths
    if name == "train":
        columns, reference = [*features, label, *inputs], "schema.json (features + label)"
    elif name == "test":  # agreement with train; train itself is checked against schema.json
        columns, reference = list(splits.train.columns), "the train split's columns"
    else:
        columns, reference = [*features, *inputs], "schema.json features"
    out: list[Expectation] = [gxe.ExpectTableColumnsToMatchOrderedList(
        column_list=columns, meta={"reference": reference})]
    if schema.text:
        out += document_expectations(df, features[0], schema.text["max_length"], params)
    else:
        out += _feature_expectations(df, features)
    out += label_expectations(name, df, schema)
    return out + ([] if schema.text else _duplicate_expectation(df, features, params.max_duplicate_frac))


def label_expectations(name: str, df: pd.DataFrame, schema: Schema) -> list[Expectation]:
    """Labels present; at least two training classes; test labels among the training classes."""
    label = schema.label_column
    if name == "transfer" or label not in df.columns:
        return []
    if name == "train":
        return [gxe.ExpectColumnValuesToNotBeNull(column=label),
                gxe.ExpectColumnUniqueValueCountToBeBetween(column=label, min_value=2)]
    return [gxe.ExpectColumnValuesToNotBeNull(column=label),
            gxe.ExpectColumnValuesToBeInSet(column=label, value_set=list(schema.classes))]


def class_counts(splits: Splits) -> pd.DataFrame:
    """Rows per training class as its own frame, so 'rows per class' is a plain column expectation."""
    label = splits.schema.label_column
    if label not in splits.train.columns:
        return pd.DataFrame({"class": pd.Series([], dtype=object), "rows": pd.Series([], dtype="int64")})
    counts = splits.train[label].value_counts(dropna=True)
    return pd.DataFrame({"class": counts.index.to_numpy(dtype=object), "rows": counts.to_numpy()})


# --- failure lines ----------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _show(value: Any) -> str:
    return repr(_plain(value))


def _examples(result: dict) -> str:
    values = [_show(v["value"]) for v in result.get("partial_unexpected_counts", [])[:_EXAMPLES]]
    return f" (e.g. {', '.join(values)})" if values else ""


def _columns(kw: dict, r: dict, _p: ValidationParams) -> str:
    expected, observed = list(kw["column_list"]), list(r.get("observed_value", []))
    missing = [c for c in expected if c not in observed]
    extra = [c for c in observed if c not in expected]
    diff = "; ".join(f"{what} {cols}" for what, cols in (("missing", missing), ("unexpected", extra)) if cols)
    return f"columns do not match {kw['reference']}: {diff or f'same columns in another order {observed}'}"


def _nulls(kw: dict, r: dict, _p: ValidationParams) -> str:
    return f"column {kw['column']!r} has {r['unexpected_count']} null value(s)"


def _infinite(kw: dict, r: dict, _p: ValidationParams) -> str:
    return f"column {kw['column']!r} has {r['unexpected_count']} infinite value(s){_examples(r)}"


def _type(kw: dict, r: dict, _p: ValidationParams) -> str:
    return f"column {kw['column']!r} is not numeric (dtype {r.get('observed_value')})"


def _label_set(kw: dict, r: dict, _p: ValidationParams) -> str:
    return (f"column {kw['column']!r} has {r['unexpected_count']} value(s) outside the training "
            f"classes{_examples(r)}")


def _class_count(kw: dict, r: dict, _p: ValidationParams) -> str:
    return (f"column {kw['column']!r} has {r.get('observed_value')} distinct class(es); "
            "training a classifier needs at least 2")


def _duplicates(kw: dict, r: dict, p: ValidationParams) -> str:
    return (f"{r['unexpected_count']} of {r['element_count']} rows ({r['unexpected_percent']:.1f}%) "
            f"repeat another row's features, more than validation.max_duplicate_frac={p.max_duplicate_frac}")


def _rows_per_class(kw: dict, r: dict, p: ValidationParams) -> str:
    bad = sorted(r["unexpected_index_list"], key=lambda row: row["rows"])
    limit = f"validation.min_rows_per_class={p.min_rows_per_class}"
    if len(bad) == 1:
        return f"class {_show(bad[0]['class'])} has {bad[0]['rows']} rows, fewer than {limit}"
    shown = ", ".join(f"class {_show(b['class'])}: {b['rows']}" for b in bad[:_EXAMPLES])
    more = ", …" if len(bad) > _EXAMPLES else ""
    return f"{len(bad)} classes have fewer rows than {limit} ({shown}{more})"


def _text_type(kw: dict, r: dict, _p: ValidationParams) -> str:
    return f"column {kw['column']!r} has {r['unexpected_count']} value(s) that are not text{_examples(r)}"


def _blank(kw: dict, r: dict, _p: ValidationParams) -> str:
    return f"column {kw['column']!r} has {r['unexpected_count']} empty or blank document(s)"


def _duplicate_text(kw: dict, r: dict, p: ValidationParams) -> str:
    return (f"{r['unexpected_count']} of {r['element_count']} documents ({r['unexpected_percent']:.1f}%) repeat "
            f"another one, more than validation.max_duplicate_frac={p.max_duplicate_frac}")


def _truncated(kw: dict, r: dict, p: ValidationParams) -> str:
    return (f"{r['unexpected_count']} of {r['element_count']} documents ({r['unexpected_percent']:.1f}%) are longer "
            f"than data.max_length={kw['max_value']} tokens, more than validation.max_truncated_frac="
            f"{p.max_truncated_frac}; raise data.max_length")


def _duplicate_images(kw: dict, r: dict, p: ValidationParams) -> str:
    return (f"{r['unexpected_count']} of {r['element_count']} images ({r['unexpected_percent']:.1f}%) repeat "
            f"another one pixel for pixel, more than validation.max_duplicate_frac={p.max_duplicate_frac}")


def _small_images(kw: dict, r: dict, p: ValidationParams) -> str:
    side = kw["column"].removeprefix("kd_")
    return (f"{r['unexpected_count']} of {r['element_count']} images ({r['unexpected_percent']:.1f}%) have a {side} "
            f"below data.image_size={int(kw['min_value'])} px, more than validation.max_small_frac={p.max_small_frac}; "
            f"lower data.image_size or leave the small images out")


def _bands(kw: dict, r: dict, _p: ValidationParams) -> str:
    return f"images with {r.get('observed_value')} channels; only 1 to 4 (grey, grey + alpha, RGB, RGBA) are read"


_DESCRIBE: dict[str, Callable[[dict, dict, ValidationParams], str]] = {
    "expect_table_columns_to_match_ordered_list": _columns,
    "expect_column_values_to_not_be_null": _nulls,
    "expect_column_values_to_not_be_in_set": _infinite,
    "expect_column_values_to_be_in_type_list": _type,
    "expect_column_values_to_be_in_set": _label_set,
    "expect_column_unique_value_count_to_be_between": _class_count,
    "expect_compound_columns_to_be_unique": _duplicates,
    "expect_column_values_to_be_unique": _duplicates,
    "rows_per_class": _rows_per_class,  # a between-expectation on the class-count frame
    "text_type": _text_type,
    "blank_text": _blank,
    "duplicate_text": _duplicate_text,
    "truncated": _truncated,
    "duplicate_images": _duplicate_images,
    "small_images": _small_images,
    "expect_column_distinct_values_to_be_in_set": _bands,
}


def _raised(result: ExpectationValidationResult) -> str | None:
    """GX reports a crashed expectation as a failure with exception details; keep its message."""
    info = result.exception_info or {}
    for entry in (info, *(v for v in info.values() if isinstance(v, dict))):
        if entry.get("raised_exception"):
            return str(entry.get("exception_message"))
    return None


def describe_failure(result: ExpectationValidationResult, where: str, params: ValidationParams) -> str:
    """One line for a failed expectation: '<where>: <what is wrong, with counts>'."""
    cfg = result.expectation_config
    assert cfg is not None  # every result of a suite run names its expectation
    meta = cfg.meta or {}
    kwargs = {**cfg.kwargs, "reference": meta.get("reference")}
    error = _raised(result)
    if error is not None:
        column = f" on column {kwargs['column']!r}" if "column" in kwargs else ""
        return f"{where}: {cfg.type}{column} could not run: {error}"
    return f"{where}: {_DESCRIBE[meta.get('check', cfg.type)](kwargs, result.result, params)}"


# --- running ----------------------------------------------------------------------------------------

def _context() -> Any:
    """An ephemeral context (nothing on disk) with GX's tqdm bars off, so stdout stays ours."""
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


def _validate(source: Any, name: str, df: pd.DataFrame, expectations: list[Expectation],
              result_format: dict[str, Any]) -> ExpectationSuiteValidationResult:
    batch = (source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
             .get_batch(batch_parameters={"dataframe": df}))
    suite = gx.ExpectationSuite(name=f"kd.{name}", expectations=expectations)
    return batch.validate(suite, result_format=result_format)


def _strict(obj: Any) -> Any:
    """GX results quote offending values such as inf; strict JSON has no spelling for them."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strict(v) for v in obj]
    return obj


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(_strict(obj), indent=2, allow_nan=False, default=str) + "\n")


def packed_expectations(df: pd.DataFrame, columns: tuple[str, ...], reference: str) -> list[Expectation]:
    """Rows built by prepare itself (packed token sequences): exactly these columns, none empty."""
    return [gxe.ExpectTableColumnsToMatchOrderedList(column_list=list(columns), meta={"reference": reference}),
            *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in columns if c in df.columns)]


Suite = tuple[str, pd.DataFrame, list[Expectation], str]  # name, frame, expectations, split whose source it names


def _statistics(df: pd.DataFrame, result: ExpectationSuiteValidationResult) -> dict:
    stats = result.statistics
    return {"rows": len(df), "columns": len(df.columns), "success": bool(result.success),
            "expectations": stats["evaluated_expectations"],
            "failed_expectations": stats["unsuccessful_expectations"]}


def validate_splits(splits: Splits, params: ValidationParams, out_dir: Path, sources: dict[str, str],
                    expectations: Callable[[str], list[Expectation]] | None = None,
                    extra: tuple[Suite, ...] | list[Suite] = ()) -> ValidationReport:
    """Run every split's suite (`expectations(split)`, by default a classifier's), the per-class suite and
    the task's `extra` suites; write `{suite}.json` and `summary.json`."""
    suite_of = expectations or (lambda name: split_expectations(name, splits, params))
    out_dir.mkdir(parents=True, exist_ok=True)
    source = _context().data_sources.add_pandas("kd")
    counts = class_counts(splits)
    rows_rule = gxe.ExpectColumnValuesToBeBetween(column="rows", min_value=params.min_rows_per_class,
                                                  meta={"check": "rows_per_class"})
    suites = [(name, getattr(splits, name), suite_of(name), _SUMMARY, name) for name in SPLITS]
    suites.insert(1, (CLASS_COUNTS, counts, [rows_rule], _CLASS_FORMAT, "train"))
    suites += [(name, df, rules, _SUMMARY, split) for name, df, rules, split in extra]
    failures: list[str] = []
    statistics: dict[str, dict] = {}
    for name, df, rules, result_format, split in suites:
        result = _validate(source, name, df, rules, result_format)
        _write_json(out_dir / f"{name}.json", result.to_json_dict())
        failures += [describe_failure(r, sources[split], params) for r in result.results if not r.success]
        statistics[name] = _statistics(df, result)
    statistics["train"]["rows_per_class"] = {str(_plain(c)): int(n) for c, n in counts.itertuples(index=False)}
    report = ValidationReport(not failures, tuple(failures), statistics)
    _write_json(out_dir / SUMMARY_FILE, report.to_json())
    return report


# --- Data Docs ----------------------------------------------------------------------------------------

_DOCS_UNUSED = ("static/images/glossary_scroller.gif",  # 3.3 MB of GX tutorial animations the
                "static/images/validation_failed_unexpected_values.gif")  # pages never show


def build_data_docs(results_dir: Path, out_dir: Path) -> Path:
    """Great Expectations Data Docs (static HTML) for the results `validate_splits` wrote.

    The saved results are loaded back into an ephemeral context's results store and GX's own site
    builder renders them into `out_dir`; returns the site's index.html.
    """
    from great_expectations.core.expectation_validation_result import ExpectationSuiteValidationResultSchema
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    context = _context()
    for site in list(context.get_site_names()):
        context.delete_data_docs_site(site)  # the ephemeral default site lives in a temporary dir
    context.add_data_docs_site("kd", {
        "class_name": "SiteBuilder", "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(out_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
    schema = ExpectationSuiteValidationResultSchema()
    for path in sorted(results_dir.glob("*.json")):
        if path.name == SUMMARY_FILE:
            continue
        result = schema.load(json.loads(path.read_text()))
        loaded = result.meta.get("batch_markers", {}).get("ge_load_time")  # stable page paths per result
        run = RunIdentifier(run_name="kd-validate", run_time=loaded)
        key = ValidationResultIdentifier(ExpectationSuiteIdentifier(result.suite_name), run, path.stem)
        context.validation_results_store.set(key, result)
    context.build_data_docs(site_names=["kd"])
    for name in _DOCS_UNUSED:
        (out_dir / name).unlink(missing_ok=True)
    return out_dir / "index.html"
