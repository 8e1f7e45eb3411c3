"""Imports only point down: library modules never import an entry point.

Entry points (the commands a user runs, and the launcher layer they share) may import
the library; the library (model, methods, checkpoints, data, evaluation, SPoT's core)
must not import them, or a library user would pull in a command line's side effects
and import cycles would follow. Imports under `if __name__ == "__main__":` (the
command-line preflight) are the module's own command line and do not count.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "hyperprompt_jax"

# Commands and the layer they share (argument parsing, gin, process setup).
ENTRY_POINTS = {
    "hyperprompt_jax.train", "hyperprompt_jax.eval", "hyperprompt_jax.infer",
    "hyperprompt_jax.count_params", "hyperprompt_jax.plan", "hyperprompt_jax.export",
    "hyperprompt_jax.launch", "hyperprompt_jax.spot_cli", "hyperprompt_jax.spot.cli",
    "hyperprompt_jax.spot.__main__", "hyperprompt_jax.spot.transfer",
}  # fmt: skip


def _module_name(path: pathlib.Path) -> str:
    parts = ["hyperprompt_jax", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_guard(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def _imports(tree: ast.AST, known: set[str]):
    """Every `hyperprompt_jax` module imported anywhere in `tree` (lazy imports too)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_main_guard(node):
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("hyperprompt_jax"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hyperprompt_jax"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                yield candidate if candidate in known else node.module
        stack.extend(ast.iter_child_nodes(node))


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {m: set(_imports(ast.parse(p.read_text()), known)) - {m} for m, p in files.items()}


def test_entry_points_exist():
    graph = _graph()
    missing = sorted(ENTRY_POINTS - set(graph))
    assert not missing, f"ENTRY_POINTS names modules that do not exist: {missing}"


def test_library_modules_never_import_entry_points():
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in _graph().items()
        if module not in ENTRY_POINTS
        for target in targets & ENTRY_POINTS
    )
    assert not upward, "library modules import entry points:\n" + "\n".join(upward)
