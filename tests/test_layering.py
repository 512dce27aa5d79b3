"""The package's layers, lowest first: a module may import its own layer's package and lower layers only.

    {errors, fileio, dtypes, jit} -> {config, folder_lock} -> checkpoint_format -> {parallel, data, kernels} -> tensor_parallel
    -> models -> ki -> convert -> training

(the entry points ``pretrain_ki.py`` and ``tools/`` sit above all of them). Imports inside functions count too:
a lazy import of a higher layer is still a dependency in the wrong direction.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_ki"
LAYERS = [
    {"errors", "fileio", "dtypes", "jit"},
    {"config", "folder_lock"},
    {"checkpoint_format"},
    {"parallel", "data", "kernels"},
    {"tensor_parallel"},
    {"models"},
    {"ki"},
    {"convert"},
    {"training"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def part_of(module: str) -> str | None:
    """``megatron_ki.training.loop`` -> ``training``; None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "megatron_ki" else None


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(imported megatron_ki part, line) for every import in ``path``, relative ones resolved."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names = [f"{module}.{a.name}" for a in node.names] if module == "megatron_ki" else [module]
        else:
            continue
        out += [(part, node.lineno) for part in map(part_of, names) if part]
    return out


def test_every_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if not p.name.startswith("_")}
    parts = {p for p in parts if (PACKAGE / p).is_dir() or (PACKAGE / f"{p}.py").is_file()}
    assert parts - {"__pycache__"} <= set(RANK), f"place these in LAYERS: {sorted(parts - set(RANK))}"


def test_no_lower_layer_imports_a_higher_one():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = part_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if own is None or own == "__init__":
            continue
        for part, line in imports_of(path):
            if part != own and RANK[part] >= RANK[own]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {part}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a models module importing training is reported."""
    fake = tmp_path / "megatron_ki"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "bad.py").write_text("def f():\n    from megatron_ki.training import loop\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert imports_of(fake / "models" / "bad.py") == [("training", 2)]
