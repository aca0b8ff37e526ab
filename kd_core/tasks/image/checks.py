"""The image task's Great Expectations suite: what validate checks on each prepared split of images."""

from __future__ import annotations

import great_expectations.expectations as gxe

from kd_core.config import ValidationParams
from kd_core.data import Splits
from kd_core.tasks.image.data import BANDS, DIGEST, FILE, HEIGHT, PIXELS, WIDTH
from kd_core.validation import label_expectations

SIZE_QUANTILES = (0.01, 0.5, 0.99)  # of the original widths and heights, reported for every split


def image_expectations(name: str, splits: Splits, params: ValidationParams) -> list:
    """One split's suite: columns, decoded pixels present, original sizes and channel counts reported, a
    cap on images smaller than data.image_size, duplicate images (by hash), labels."""
    df, schema = getattr(splits, name), splits.schema
    size = schema.image_info["size"]
    columns = [PIXELS, FILE, WIDTH, HEIGHT, BANDS, DIGEST] + ([schema.label_column] if name != "transfer" else [])
    out: list = [gxe.ExpectTableColumnsToMatchOrderedList(column_list=columns,
                                                          meta={"reference": "the image task's prepared columns"}),
                 gxe.ExpectColumnValuesToNotBeNull(column=PIXELS),
                 gxe.ExpectColumnValuesToBeUnique(column=DIGEST, mostly=1.0 - params.max_duplicate_frac,
                                                  meta={"check": "duplicate_images"}),
                 gxe.ExpectColumnDistinctValuesToBeInSet(column=BANDS, value_set=[1, 2, 3, 4])]
    for side in (WIDTH, HEIGHT):
        out += [gxe.ExpectColumnValuesToBeBetween(column=side, min_value=size, mostly=1.0 - params.max_small_frac,
                                                  meta={"check": "small_images", "size": size}),
                gxe.ExpectColumnQuantileValuesToBeBetween(
                    column=side, quantile_ranges={"quantiles": list(SIZE_QUANTILES),
                                                  "value_ranges": [[1, None]] * len(SIZE_QUANTILES)})]
    return out + label_expectations(name, df, schema)
