"""The layers of docs/architecture.md: a module may import only from its own layer or lower ones.

Every ``import finegrain.X`` / ``from finegrain.X import`` in the package is checked, including
imports inside functions (a lazy import that runs upward is still an upward dependency).
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "finegrain"

# lowest first; a module in layer k may import layers 0..k
LAYERS = [
    {"registry", "shapes", "ranges", "jsonl", "masked", "trajectory", "segment", "lock", "guards", "progress", "toolcalls"},
    {"credit", "losses", "filters", "tasks", "models"},
    {"sampling", "rewards"},
    {"envs"},
    {"eval"},
    {"config"},
    {"train", "threads"},
    {"cli", "recipes", "compare", "integrations", "__main__", "__init__"},
]
LAYER_OF = {name: k for k, names in enumerate(LAYERS) for name in names}


def top_level(module_path: Path) -> str:
    rel = module_path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def finegrain_imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finegrain."):
            yield node.lineno, node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("finegrain."):
                    yield node.lineno, a.name.split(".")[1]


def test_every_package_module_has_a_layer():
    names = {top_level(p) for p in PKG.rglob("*.py")}
    assert names <= set(LAYER_OF), f"add to LAYERS (and docs/architecture.md): {sorted(names - set(LAYER_OF))}"


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_no_module_imports_a_higher_layer(path):
    here = top_level(path)
    upward = [(line, dep) for line, dep in finegrain_imports(path)
              if dep in LAYER_OF and LAYER_OF[dep] > LAYER_OF[here]]
    assert not upward, f"{path.relative_to(PKG)} (layer {LAYER_OF[here]} '{here}') imports higher layers: " + \
        ", ".join(f"line {ln}: finegrain.{dep} (layer {LAYER_OF[dep]})" for ln, dep in upward)
