"""The package's modules import along the data flow, never their callers.

z -> h -> r -> (edit) -> f -> x -> segment -> tally -> report: the generators and the segmenter
know nothing of dissection; dissection (statistics, scores, rankings, the report) knows nothing of
the interventions, the apps or the command line; nothing but the command line imports it. Every
import counts, the ones inside functions too (read from the source with ``ast``), so a lazy import
cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gandissect_jax"

# what each part may never import (directly or in a function body)
APPS = {"commands", "cli", "paint", "pages", "experiment"}
INTERVENTION = {"intervention", "ace", "effects", "artifacts", "unitseg"}
FORBIDDEN = {
    "generator": {"dissection", "segmenter", "scenes", "proggan", "flax_split", "flax_programs"} | INTERVENTION | APPS,
    "segmenter_protocol": {"dissection", "segmenter", "scenes", "proggan", "generator", "flax_split", "flax_programs"}
    | INTERVENTION | APPS,
    "flax_split": {"dissection", "segmenter", "scenes"} | INTERVENTION | APPS,
    "flax_programs": {"dissection", "segmenter", "scenes", "flax_split"} | INTERVENTION | APPS,
    "proggan": {"dissection", "segmenter", "scenes"} | INTERVENTION | APPS,
    "segmenter": {"dissection", "proggan"} | INTERVENTION | APPS,
    "pth": {"dissection", "segmenter", "proggan", "scenes", "weights", "weight_registry", "checkpoints"}
    | INTERVENTION | APPS,
    "weight_registry": {"dissection", "segmenter", "proggan", "scenes", "weights", "checkpoints", "downloads"}
    | INTERVENTION | APPS,
    "sampling": {"dissection", "segmenter", "proggan", "scenes"} | INTERVENTION | APPS,
    "dissection": INTERVENTION | APPS | {"segmenter", "proggan", "scenes", "weights", "weight_registry",
                                         "checkpoints"},
    "intervention": APPS,
    "ace": APPS,
    "effects": APPS,
    "artifacts": APPS,
    "unitseg": APPS,
    "paint": {"commands", "cli"},
    "pages": {"commands", "cli", "paint"},
    "experiment": {"commands", "cli", "paint"},
}


def _module_name(path: Path, package: Path = PACKAGE) -> tuple[str, str]:
    """(dotted module name, dotted package its relative imports resolve against)."""
    parts = path.relative_to(package.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def _imports(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every gandissect_jax module or name this file imports, as a dotted path."""
    _, package = _module_name(path, root)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "gandissect_jax"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "gandissect_jax":
                continue
            found |= {f"{module}.{a.name}" for a in node.names} if module == "gandissect_jax" else {module}
    return found


def _part(dotted: str) -> str:
    """The top-level part of the package a dotted path belongs to ('' for the package itself)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else ""


def import_graph() -> dict[str, dict[str, list[str]]]:
    """{part: {imported part: [importing files]}} over every module of the package."""
    graph: dict[str, dict[str, list[str]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _part(_module_name(path)[0])
        for target in _imports(path):
            part = _part(target)
            if part and part != source:
                graph[source][part].append(str(path.relative_to(PACKAGE.parent)))
    return graph


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: function-level, relative (two packages up) and absolute imports are all
    found, so the test below cannot pass by not seeing them."""
    package = tmp_path / "gandissect_jax"
    (package / "dissection").mkdir(parents=True)
    path = package / "dissection" / "report.py"
    path.write_text("import numpy\nfrom .results import X\n\ndef f():\n    from ..paint import app\n"
                    "    import gandissect_jax.ace.fit\n    from gandissect_jax import effects\n")
    assert _imports(path, package) == {"gandissect_jax.dissection.results", "gandissect_jax.paint",
                                       "gandissect_jax.ace.fit", "gandissect_jax.effects"}


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_no_module_imports_its_caller(part):
    assert (PACKAGE / part).exists() or (PACKAGE / f"{part}.py").exists(), part
    graph = import_graph()
    wrong = {target: files for target, files in graph.get(part, {}).items() if target in FORBIDDEN[part]}
    assert not wrong, (f"gandissect_jax.{part} imports what is downstream of it in the data flow: "
                       + "; ".join(f"{target} (in {', '.join(sorted(set(files)))})" for target, files in wrong.items()))
