"""The shape ARCHITECTURE.md describes, checked: no import circle, the model library free of the
config, imports at the top (inside a function only with a reason on the line), modules readable
in one sitting, the stage table, and the page's tree naming every module."""

import ast
import re
from pathlib import Path

from dmlkit.pipeline.table import STAGE_NAMES, STAGES

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dmlkit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(dmlkit module or package imported, whether inside a function, line) of every import."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    inner = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(fn)
        if isinstance(node, ast.Import | ast.ImportFrom)
    }
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base) if node.level else node.module or ""
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        found += [(t, id(node) in inner, node.lineno) for t in targets]
    return found


def test_no_import_circle_in_the_package():
    graph = {m: {t for t, _, _ in imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, "import circle: " + " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_model_library_imports_nothing_from_the_config_or_the_pipeline():
    for name, path in MODULES.items():
        if name.startswith("dmlkit.models"):
            bad = [
                t for t, _, _ in imports(path) if t.startswith(("dmlkit.config", "dmlkit.pipeline", "dmlkit.stages"))
            ]
            assert not bad, f"{path} imports {bad}"


def test_imports_inside_functions_are_for_heavy_or_optional_dependencies_and_say_why():
    """Inside a function only: optional packages (kornia, trackers, wildlife-datasets) and the stage
    machinery the light commands skip (cli.py's `commands`); each with its reason on the line."""
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        for target, inner, line in imports(path):
            if not inner:
                continue
            assert "#" in lines[line - 1], f"{path}:{line}: an import inside a function needs its reason on the line"
            if target.startswith("dmlkit"):
                assert (path.name, target) == ("cli.py", "dmlkit.commands"), (
                    f"{path}:{line}: import {target} at the top"
                )


def test_modules_read_in_one_sitting():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_the_stage_table_lists_each_stage_once_with_its_declaration():
    assert STAGE_NAMES == ("folds", "train", "embed", "ensemble", "retrieve", "submit")
    assert [s.name for s in STAGES if s.per_member] == ["train", "embed"]
    for stage in STAGES:
        declared_in = MODULES[f"dmlkit.stages.{stage.name}"].read_text()
        assert f'name="{stage.name}"' in declared_in and stage.run.__module__ == f"dmlkit.stages.{stage.name}"
        assert stage.outputs and stage.version >= 1 and stage.hashes
    # the facts live in the declarations only: no other module keeps a table of versions or outputs
    for name, path in MODULES.items():
        text = path.read_text()
        assert not re.search(r"^(VERSIONS|OUTPUTS)\s*=", text, re.M), name


def test_the_architecture_page_names_every_module_and_only_modules_that_exist():
    page = (ROOT / "ARCHITECTURE.md").read_text()
    tree = page.split("## The tree", 1)[1].split("```")[1]
    named: set[str] = set()
    folder = ""
    for line in tree.splitlines()[2:]:
        head = line[2:].split("  ", 1)[0].strip()
        if head.endswith("/"):
            folder = head
        elif head.endswith(".py"):
            folder = ""
            named.add(head)
        named |= {folder + word for word in re.findall(r"\b([a-z_]+\.py)\b", line) if folder}
    files = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert not files - named, f"modules missing from ARCHITECTURE.md: {sorted(files - named)}"
    assert not named - files, f"ARCHITECTURE.md names modules that do not exist: {sorted(named - files)}"


def test_functions_fit_a_screen_and_long_parameter_lists_say_why():
    """No function over 60 lines; one over 8 parameters carries its reason on the `def` line."""
    for path in MODULES.values():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
            assert node.end_lineno - node.lineno < 60, f"{where}: {node.end_lineno - node.lineno + 1} lines"
            args = node.args
            count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
            count -= bool(args.args) and args.args[0].arg in ("self", "cls")
            assert count <= 8 or "#" in lines[node.lineno - 1], f"{where}: {count} parameters and no reason"
