"""DESIGN.md, Layout: a layer imports only the layers above it (cli, config, bids, core,
interfaces, workflows, reports, simulate; cli and the runner are the composition root): core
knows nothing of Nipype, interfaces know nothing of workflows, workflows contain no numpy.

Checked on the source (AST), imports inside functions included: a lazy import is still one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
ORDER = ("core", "interfaces", "workflows", "reports", "simulate")
ROOT = ("pipeline.cli", "pipeline.runner")
# third-party packages a layer must not use
FORBIDDEN_LIBS = {"core": ("nipype",), "workflows": ("numpy", "scipy", "SimpleITK", "nibabel")}


def imported_modules(source: str, module: str) -> set[str]:
    """Every module ``source`` (the text of ``module``, dotted) imports, anywhere in it;
    ``from a import b`` counts as ``a`` and ``a.b`` (b may be a module), relative imports are
    resolved against ``module``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def violations(layer: str, source: str, module: str) -> list[str]:
    """The imports of ``module`` (in ``layer``) that DESIGN.md forbids."""
    below = [f"pipeline.{name}" for name in ORDER[ORDER.index(layer) + 1:]] + list(ROOT)
    libs = FORBIDDEN_LIBS.get(layer, ())
    bad = []
    for name in sorted(imported_modules(source, module)):
        if any(name == b or name.startswith(b + ".") for b in below) or \
                name.split(".")[0] in libs:
            bad.append(name)
    return bad


@pytest.mark.parametrize("layer", ["core", "interfaces", "workflows"])
def test_layer_imports_only_the_layers_above_it(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    bad = {}
    for path in files:
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if found := violations(layer, path.read_text(), module):
            bad[str(path.relative_to(PACKAGE.parent))] = found
    assert not bad, f"imports against DESIGN.md's layering: {bad}"


def test_the_check_sees_lazy_relative_and_package_imports():
    # session 9's SubjectReport imported the reports inside its _run_interface
    lazy = "class A:\n    def run(self):\n        from pipeline.reports.subject import x\n"
    assert violations("interfaces", lazy, "pipeline.interfaces.outputs") == [
        "pipeline.reports.subject", "pipeline.reports.subject.x"]
    assert violations("interfaces", "from ..reports import subject\n",
                      "pipeline.interfaces.outputs") == ["pipeline.reports",
                                                         "pipeline.reports.subject"]
    assert violations("workflows", "from pipeline import reports\n",
                      "pipeline.workflows.base") == ["pipeline.reports"]
    assert violations("workflows", "import numpy as np\n", "pipeline.workflows.base") == ["numpy"]
    assert violations("core", "from nipype.interfaces.base import File\n",
                      "pipeline.core.x") == ["nipype.interfaces.base",
                                             "nipype.interfaces.base.File"]
    assert violations("core", "from pipeline.runner import run_subject\n",
                      "pipeline.core.x") == ["pipeline.runner", "pipeline.runner.run_subject"]
    # the layers above are allowed, and a name that only starts like a layer is not one
    assert violations("workflows", "from pipeline.interfaces.outputs import A\n"
                      "import pipeline.reportsx\n", "pipeline.workflows.base") == []
