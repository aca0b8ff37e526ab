"""Every registered task has what the `Task` protocol declares: each attribute (of the declared kind)
and each method with the protocol's parameters, by name, kind and order, and its defaults.

mypy checks the same through each package's typed `TASK: Task` (`make lint`); this catches a gap without it."""

from __future__ import annotations

import inspect
import typing

import pytest

from kd_core import tasks
from kd_core.tasks.base import Task

ATTRS = typing.get_type_hints(Task)  # name -> declared type
METHODS = {name: inspect.signature(fn) for name, fn in vars(Task).items()  # name -> signature, self included
           if inspect.isfunction(fn) and not name.startswith("_")}


def _fits(value: object, kind: object) -> bool:
    """`value` is of an attribute's declared type: a class (str, dict) or tuple[X, ...]."""
    if typing.get_origin(kind) is tuple:
        item, _ = typing.get_args(kind)
        return isinstance(value, tuple) and all(isinstance(v, item) for v in value)
    assert isinstance(kind, type), f"the test does not know how to check {kind}"
    return isinstance(value, kind)


def gaps(task: object) -> list[str]:
    """Where `task` differs from the protocol, one line each; [] when it satisfies it."""
    cls, out = type(task).__name__, []
    for name, kind in ATTRS.items():
        if not hasattr(task, name):
            out.append(f"{cls} lacks the attribute {name!r}")
        elif not _fits(getattr(task, name), kind):
            out.append(f"{cls}.{name} = {getattr(task, name)!r} is not {kind}")
    for name, want in METHODS.items():
        method = getattr(type(task), name, None)
        if not callable(method):
            out.append(f"{cls} lacks the method {name}{want}")
            continue
        got = inspect.signature(method)
        if [(p.name, p.kind, p.default) for p in got.parameters.values()] != \
                [(p.name, p.kind, p.default) for p in want.parameters.values()]:
            out.append(f"{cls}.{name}{got} is not the protocol's {name}{want}")
    return out


def test_the_protocol_is_what_the_test_reads() -> None:
    assert {"name", "outputs", "serving_params", "headline", "dynamic_axes"} <= set(ATTRS)
    assert {"prepare", "build", "load", "score", "metrics", "serving_inputs", "answer", "example"} <= set(METHODS)
    assert list(METHODS["metrics"].parameters) == ["self", "model", "spec", "scores", "weights_file", "latency_ms"]


@pytest.mark.parametrize("key", tasks.names())
def test_registered_task_satisfies_the_protocol(key: str) -> None:
    assert tasks.get(key).name == key
    assert gaps(tasks.get(key)) == []


def test_a_gap_is_named() -> None:
    """The check itself: a missing method (LMTask once lacked `metrics`), a renamed parameter, a lost
    default and an attribute of the wrong kind are each reported."""
    base = type(tasks.get("tabular"))

    class Drifted(base):
        metrics = None
        outputs = ["classes"]

        def example(self, spec, n=1):
            return super().example(spec, n)

        def build(self, spec, x_train, seed, init):
            return super().build(spec, x_train, seed, init)

    found = gaps(Drifted())
    assert len(found) == 4, found
    for what in ("Drifted.outputs = ['classes']", "Drifted lacks the method metrics",
                 "Drifted.example(self, spec, n=1)", "Drifted.build(self, spec, x_train, seed, init)"):
        assert any(g.startswith(what) for g in found), (what, found)
