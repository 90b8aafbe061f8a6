"""How train_gpt.py reads: top to bottom, the core (flags, kernels, optimizers, norms, model, data, the step), then
the infrastructure around it (logging, checkpoints, flag checks, stop signals), then the loop and main; a reader
meets every name before it is used."""

import ast
from pathlib import Path

import train_gpt as T

SOURCE = Path(T.__file__).read_text()
# The registries are declared with the flags, whose choices they are, before the classes of their entries (see the
# comment above NORMS): their annotations are the only names of a later definition.
ALLOWED = {("ATTENTION", "Attention"), ("NORMS", "Norm"), ("OPTIMIZERS", "OptimizerEntry")}


def top_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def bound_inside(node: ast.stmt) -> set[str]:
    """Names a definition binds for itself (arguments, locals, nested definitions): a parameter called world_size
    is not the function world_size."""
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.arg):
            names.add(sub.arg)
        elif isinstance(sub, ast.Name) and isinstance(sub.ctx, (ast.Store, ast.Del)):
            names.add(sub.id)
        elif isinstance(sub, (ast.FunctionDef, ast.ClassDef)) and sub is not node:
            names.add(sub.name)
    return names


def later_names(source: str) -> set[tuple[str, str]]:
    """(definition, name it uses) for every module-level name used above its own definition, annotations included
    (under `from __future__ import annotations` they are strings at run time, but a reader still meets them)."""
    body = ast.parse(source).body
    defined_at: dict[str, int] = {}
    for i, node in enumerate(body):
        for name in top_names(node):
            defined_at.setdefault(name, i)
    found = set()
    for i, node in enumerate(body):
        own = bound_inside(node) if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else set()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id not in own \
                    and defined_at.get(sub.id, -1) > i:
                found.add(((top_names(node) or [type(node).__name__])[0], sub.id))
    return found


def test_no_definition_names_one_below_it():
    assert later_names(SOURCE) - ALLOWED == set()


def test_the_check_finds_a_later_name_and_ignores_a_parameter_of_the_same_name():
    source = "def a(world_size):\n    return world_size + b()\n\n\ndef b():\n    return 1\n\n\ndef world_size():\n    pass\n"
    assert later_names(source) == {("a", "b")}


def test_the_sections_come_in_reading_order():
    headers = [line.removeprefix("# ---- ").split(" ----")[0].split(":")[0] for line in SOURCE.splitlines()
               if line.startswith("# ---- ")]
    assert headers == ["hyperparameters", "kernels", "distributed", "optimizers", "norms", "model", "data", "the step",
                       "logging", "checkpoints", "flag checks and the command line", "stop signals", "the loop", "main"]
