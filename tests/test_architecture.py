"""docs/architecture.md names the functions an export flows through; each name must exist in the code. And the
service imports only what it declares it needs at run time."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"


def resolve(dotted: str) -> object:
    """The object a dotted name such as service.runner.JobRun.export names, importing the longest module."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ModuleNotFoundError(dotted)


def test_every_function_the_architecture_page_names_exists() -> None:
    names = sorted(set(re.findall(r"`(service\.[A-Za-z_][\w.]*)`", DOC.read_text())))
    assert len(names) >= 30, names  # the page names the path end to end
    missing = []
    for name in names:
        try:
            resolve(name)
        except (AttributeError, ModuleNotFoundError):
            missing.append(name)
    assert not missing, f"docs/architecture.md names what the code does not have: {missing}"


def test_every_package_the_service_imports_is_a_runtime_dependency() -> None:
    # The image installs the runtime dependencies only: a module the service imports from a dev extra would
    # fail there, though every test passes here.
    import ast
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower().replace("_", "-") for dep in project["dependencies"]}
    owners = packages_distributions()
    imported: set[str] = set()
    for path in (ROOT / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "service"}
    missing = {name: owners.get(name) for name in third_party
               if not {dist.lower().replace("_", "-") for dist in owners.get(name, [name])} & declared}
    assert not missing, f"imported by service/ but not in [project].dependencies: {missing}"
