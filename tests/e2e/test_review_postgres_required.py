"""The PostgreSQL server tests never pass without PostgreSQL: they skip saying why, and in CI
(KD_REQUIRE_POSTGRES=1, set by .ci/run) they fail."""

import pytest

from tests.e2e.test_servers import no_postgres


def test_without_postgres_the_tests_skip_with_the_reason(monkeypatch):
    monkeypatch.delenv("KD_REQUIRE_POSTGRES", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"PostgreSQL could not start here \(no initdb\)"):
        no_postgres("no initdb")


def test_ci_requires_postgres(monkeypatch):
    monkeypatch.setenv("KD_REQUIRE_POSTGRES", "1")
    with pytest.raises(pytest.fail.Exception, match=r"\(no initdb\).*KD_REQUIRE_POSTGRES=1 requires it"):
        no_postgres("no initdb")


def test_ci_sets_the_requirement():
    from tests.conftest import ROOT

    assert "export KD_REQUIRE_POSTGRES=1" in (ROOT / ".ci/run").read_text()
