"""docs/architecture.md names the functions an export flows through; each name must exist in the code."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"


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
