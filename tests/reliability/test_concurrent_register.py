"""Three processes register the same candidate at once (a retried task racing its first attempt, two
workers on one commit): the registry lock and the idempotence check let exactly one version through."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.e2e.test_registry import NAME, evaluated_project
from tests.reliability.conftest import Damage

pytestmark = pytest.mark.slow
RACERS = 3
SCRIPT = ("import sys; from pathlib import Path; from kd_core.config import Params; "
          "from kd_core.stages import register; print(register.run(Params(), Path(sys.argv[1])).summary())")


@pytest.mark.fault("concurrent identical registrations")
def test_racing_identical_registrations_make_one_version(tmp_path: Path, tally: Damage,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    root = evaluated_project(tmp_path / "proj")  # the store does not exist yet: the racers also race to
    # create its schema, which MLflow cannot do twice at once (kd_core.tracking.mlflow_client serializes it)
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(root)], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(RACERS)]
    outs = [p.communicate(timeout=300) for p in procs]
    client = MlflowClient(tracking_uri=uri)
    versions = client.search_model_versions(f"name='{NAME}'")
    tally.wrongly_registered(len(versions) - 1)

    assert [p.returncode for p in procs] == [0] * RACERS, [err[-2000:] for _, err in outs]
    summaries = [out.strip().splitlines()[-1] for out, _ in outs]
    assert sum(" promoted " in s for s in summaries) == 1, summaries
    assert sum(" unchanged " in s for s in summaries) == RACERS - 1, summaries
    assert [int(v.version) for v in versions] == [1]
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == 1
    assert json.loads((root / "metrics/register.json").read_text())["version"] == 1
    assert [m.name for m in client.search_registered_models(f"name LIKE '{NAME}.lock%'")] == []
