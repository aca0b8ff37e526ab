"""Edge export: the ONNX files pass ONNX's own checker, and an invalid graph is a one-line error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kd_core import export, models, tasks
from kd_core.config import ExportParams
from kd_core.data import Schema
from kd_core.errors import UserError

SCHEMA = Schema(tuple(f"f{i}" for i in range(5)), "y", (0, 1, 2))


def test_fp32_and_int8_exports_pass_the_checker_and_match_pytorch(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(64, 5)).astype(np.float32)
    spec = models.ModelSpec("mlp", {"hidden": [16]}, SCHEMA)
    model = models.build(spec, x, seed=0)
    export.to_onnx(model, tasks.get("tabular"), spec, tmp_path / export.ONNX_FILE)
    inputs = export.Int8Inputs(x[:32], x[32:], ExportParams())
    recipe = export.make_int8(tasks.get("tabular"), tmp_path / export.ONNX_FILE, tmp_path / export.INT8_FILE,
                              inputs, 1, len(SCHEMA.classes))
    got = export._run_onnx(export.session(tmp_path / export.ONNX_FILE, 1), x)
    assert np.abs(got - models.predict_logits(model, x)).max() < export.FP32_TOLERANCE
    q = export._run_onnx(export.session(tmp_path / export.INT8_FILE, 1), x[32:])
    assert (q.argmax(1) == got[32:].argmax(1)).mean() == recipe.chosen.agreement  # scored on the selection rows
    assert recipe.calibration_rows == 32 and recipe.selection_rows == 32


def test_an_invalid_graph_is_refused_with_one_line(tmp_path: Path) -> None:
    node = helper.make_node("Relu", ["missing_input"], ["logits"])  # reads a tensor nothing defines
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(UserError, match=r"^bad.onnx: not a valid ONNX model: ") as err:
        export.check(path)
    assert "\n" not in str(err.value)
