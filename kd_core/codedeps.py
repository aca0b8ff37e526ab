"""Each DVC stage's code dependencies, computed from the imports of its stage module.

"A code change re-runs exactly the stages it affects" holds only while dvc.yaml lists every kd_core
file a stage can execute. Hand-kept lists drift, so they are generated: the import closure of
`kd_core/stages/NAME.py` (imports inside functions included: a lazy import is still code the stage
may run), plus the `__init__.py` of every package on the way, since importing a module runs them.

Tasks are packages loaded by name (`kd_core.tasks.get`), so a stage that asks a task depends on
`kd_core/tasks/${task}`: DVC fills in params.yaml's `task`, and a tabular project does not re-run on an
edit to the lm package. The shared modules the task packages import when loaded (module-level imports,
followed from each package's `__init__.py`; kd_core.tasks._hf, ...) are listed too, for every task. A task
method's lazy import of generic code (the card, the registry) is code of the stage that calls it, which
imports that module itself.

    python -m kd_core.codedeps          # exit 1 and name the stages whose deps differ
    python -m kd_core.codedeps --write  # rewrite the kd_core/ entries of dvc.yaml's deps
"""

from __future__ import annotations

import ast
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TypeGuard

PACKAGE = "kd_core"
TASKS = f"{PACKAGE}.tasks"  # its subpackages are the tasks
TASK_DEP = f"{PACKAGE}/tasks/${{task}}"  # the selected task's package, as dvc.yaml names it
ROOT = Path(__file__).resolve().parents[1]  # the project root that holds kd_core/ and dvc.yaml


def _module_file(name: str, root: Path) -> Path | None:
    """The file of dotted module `name` under `root`, or None if it is not a kd_core module."""
    base = root.joinpath(*name.split("."))
    if (base / "__init__.py").exists():
        return base / "__init__.py"
    file = base.with_suffix(".py")
    return file if file.exists() else None


def _is_type_checking(node: ast.AST) -> TypeGuard[ast.If]:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node that can run: the bodies of `if TYPE_CHECKING:` (annotations only) are skipped."""
    for child in ast.iter_child_nodes(tree):
        if _is_type_checking(child):
            yield from (n for stmt in child.orelse for n in _runtime_nodes(stmt))
            continue
        yield child
        yield from _runtime_nodes(child)


def _module_level(tree: ast.AST) -> Iterator[ast.AST]:
    """Statements that run when the module is imported (functions' bodies do not)."""
    for child in ast.iter_child_nodes(tree):
        if _is_type_checking(child) or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        yield child
        if isinstance(child, ast.ClassDef | ast.If | ast.Try | ast.With):
            yield from _module_level(child)


def _imported(tree: ast.AST, root: Path, lazy: bool = True) -> set[str]:
    """Dotted kd_core modules a module imports, wherever in it the import statement stands (inside a
    function too, unless `lazy` is False: a lazy import is still code the stage may run)."""
    found: set[str] = set()
    for node in (_runtime_nodes(tree) if lazy else _module_level(tree)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            found.add(node.module)
            for alias in node.names:  # `from kd_core import models`: a submodule, not a name
                if _module_file(f"{node.module}.{alias.name}", root):
                    found.add(f"{node.module}.{alias.name}")
    return found


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _task_side(name: str) -> bool:
    """Task code: the task packages and what they share under kd_core/tasks/ (the protocol and its
    classifier methods), walked by task_deps; `kd_core.tasks` itself, the registry, is generic."""
    return name.startswith(f"{TASKS}.")


def _in_package(name: str, root: Path) -> bool:
    """A module of one task package (listed by dvc.yaml as the package's directory)."""
    parts = name.split(".")
    return len(parts) > 2 and (root.joinpath(*parts[:3]) / "__init__.py").exists()


def closure(module: str, root: Path = ROOT) -> list[str]:
    """Project-relative paths of every generic kd_core file importing `module` can execute, sorted (task
    packages are not followed: see task_deps)."""
    todo, seen, files = [module], set(), set()
    while todo:
        for name in _with_parents(todo.pop()):
            if name in seen or _task_side(name):
                continue
            seen.add(name)
            file = _module_file(name, root)
            if file is None:
                continue
            files.add(file.relative_to(root).as_posix())
            todo.extend(_imported(ast.parse(file.read_text(), str(file)), root))
    return sorted(files)


def task_names(root: Path = ROOT) -> list[str]:
    base = root / PACKAGE / "tasks"
    return sorted(p.parent.name for p in base.glob("*/__init__.py") if not p.parent.name.startswith("_"))


def task_deps(root: Path = ROOT) -> list[str]:
    """The files loading any task package runs outside the package: its module-level imports, followed
    through task code, then every generic module they reach with its whole closure."""
    todo, seen, generic, shared = [f"{TASKS}.{t}" for t in task_names(root)], set(), set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if not _task_side(name):
            generic.add(name)
            continue
        file = _module_file(name, root)
        if file is None:
            continue
        if not _in_package(name, root):
            shared.add(file.relative_to(root).as_posix())
        todo.extend(_imported(ast.parse(file.read_text(), str(file)), root, lazy=False))
    return sorted(shared | {f for name in generic for f in closure(name, root)})


def stage_deps(stage: str, root: Path = ROOT) -> list[str]:
    """The code a `kd stage NAME` process runs for `stage`, the CLI's wiring aside: its generic closure and,
    when it asks a task, the selected task's package and what loading a task runs."""
    own = closure(f"{PACKAGE}.stages.{stage}", root)
    if f"{PACKAGE}/tasks/__init__.py" not in own:
        return own
    return sorted({*own, *task_deps(root)}) + [TASK_DEP]


def listed_deps(dvc_yaml: dict, stage: str) -> list[str]:
    """The kd_core files dvc.yaml lists as `stage`'s deps."""
    return sorted(d for d in dvc_yaml["stages"][stage].get("deps", []) if str(d).startswith(f"{PACKAGE}/"))


def drift(root: Path = ROOT) -> dict[str, tuple[list[str], list[str]]]:
    """Stage -> (missing from dvc.yaml, listed but not run) for every stage whose code deps differ."""
    import yaml

    doc = yaml.safe_load((root / "dvc.yaml").read_text())
    out = {}
    for stage in doc["stages"]:
        want, have = set(stage_deps(stage, root)), set(listed_deps(doc, stage))
        if want != have:
            out[stage] = (sorted(want - have), sorted(have - want))
    return out


def write(root: Path = ROOT) -> None:
    """Replace the kd_core/ entries of every stage's deps (other deps and comments are kept)."""
    from ruamel.yaml import YAML  # keeps comments and order; it comes with DVC

    from kd_core.fs import atomic_write_text

    rt = YAML()
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    path = root / "dvc.yaml"
    doc = rt.load(path.read_text())
    for stage, body in doc["stages"].items():
        deps = body["deps"]
        others = [d for d in deps if not str(d).startswith(f"{PACKAGE}/")]
        deps.clear()
        deps.extend([*stage_deps(stage, root), *others])
    buf = io.StringIO()
    rt.dump(doc, buf)
    atomic_write_text(path, buf.getvalue())


def main(argv: list[str]) -> int:
    if "--write" in argv:
        write()
        return 0
    problems = drift()
    for stage, (missing, extra) in problems.items():
        print(f"dvc.yaml stage {stage}: missing {missing}, not run {extra}", file=sys.stderr)
    if problems:
        print("fix: python -m kd_core.codedeps --write", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
