"""The package layout: imports go downwards only, and no two modules import each other."""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "visatb_jax")

# What each layer may import from the project (besides itself).
ALLOWED = {
    "core": set(),
    "runtime": set(),
    "data": {"runtime"},
    "model": {"runtime", "core"},
    "train": {"core", "model", "runtime"},
    "pipeline": {"core", "data", "model", "runtime", "train"},
    "cli": {"core", "data", "model", "runtime", "train", "pipeline"},
}


def _modules() -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, name), os.path.dirname(PACKAGE))
        module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
        out[module] = os.path.join(root, name)
  return out


def _runtime_nodes(tree: ast.AST):
  """Every node, skipping `if TYPE_CHECKING:` blocks (annotations only, never executed)."""
  for node in ast.iter_child_nodes(tree):
    if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
      continue
    yield node
    yield from _runtime_nodes(node)


def _imports(path: str) -> set[str]:
  """Every project module a file imports, at any depth of the file (lazy imports too)."""
  found = set()
  for node in _runtime_nodes(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("visatb_jax")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("visatb_jax"):
      found.add(node.module)
      found |= {f"{node.module}.{a.name}" for a in node.names}
  return found


MODULES = _modules()


def _layer(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m)))
def test_imports_go_downwards(module):
  layer = _layer(module)
  for target in _imports(MODULES[module]):
    other = _layer(target)
    if other and other != layer:
      assert other in ALLOWED[layer], f"{module} imports {target}: {layer} may not use {other}"


def test_no_import_cycle():
  graph = {m: {t for t in _imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
  # Packages re-export their modules; an edge into a package's __init__ is an edge into it.
  seen, stack = set(), []

  def visit(node):
    if node in stack:
      cycle = stack[stack.index(node):] + [node]
      raise AssertionError("import cycle: " + " -> ".join(cycle))
    if node in seen:
      return
    stack.append(node)
    for nxt in sorted(graph[node]):
      if not (nxt in ("visatb_jax",) or node.startswith(nxt + ".")):  # a module and its package
        visit(nxt)
    stack.pop()
    seen.add(node)

  for module in sorted(graph):
    visit(module)
