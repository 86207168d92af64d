"""The package's layering: every import, module-level or inside a function, points down or sideways.

A module may import from its own layer or the layers below it, never from a layer above. The table is the
architecture docs/development.md's "Layout" describes; a new module gets a row here, or the test names it.
The modules of the vae_scale/cli package are one layer, `cli`. The body of an `if __name__ == "__main__":`
block is left out: it runs only when the module is the program (`python -m vae_scale.evaluate` hands its
arguments to the command line), never when something imports the module.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {
    # 0. what everything stands on: configuration, errors, file-system checks, the fused ops
    "config": 0,
    "config_reference": 0,
    "outputs": 0,
    "kernels": 0,
    # 1. files of weights: diffusers folders and names; checkpoint folders (layout, manifest, run lock)
    "weights": 1,
    "checkpoint": 1,
    "safe_dcp": 1,
    # 2. the model
    "model": 2,
    "models": 2,  # the model families, one module each
    "tiled": 2,  # the layer-by-layer tiled pass the model runs
    # 3. the parts of training and evaluation
    "data": 3,
    "ema": 3,
    "equivariance": 3,
    "fsdp": 3,
    "image_reader": 3,
    "losses": 3,
    "metrics": 3,
    "monitor": 3,
    "preflight": 3,
    "run_state": 3,
    "shard_reader": 3,
    "shards": 3,
    "spectrum": 3,
    "startup": 3,
    "stop": 3,
    "summary": 3,
    "synthetic": 3,
    "train_log": 3,
    "transforms": 3,
    # 4. the trainer: its pieces, and the Trainer that puts them together
    "build": 4,
    "train": 4,
    # 5. the commands: what each does, as functions a Python user calls
    "commands": 5,
    "compare": 5,
    "demo": 5,
    "evaluate": 5,
    "export": 5,
    "generate": 5,
    "__init__": 5,  # the package's convenience imports
    # 6. the command line: every command's flags, parsed and checked, then the functions above called
    "cli": 6,
    "__main__": 6,
}


def _package_modules() -> dict[str, list[Path]]:
    """Layer name -> its files: one per module, every file of the cli package under "cli"."""
    modules = {p.stem: [p] for p in (ROOT / "vae_scale").glob("*.py")}
    modules["kernels"] = [ROOT / "kernels" / "__init__.py"]
    modules["cli"] = sorted((ROOT / "vae_scale" / "cli").glob("*.py"))
    modules["models"] = sorted((ROOT / "vae_scale" / "models").glob("*.py"))
    return modules


def _is_main_block(node: ast.AST) -> bool:
    """`if __name__ == "__main__":`"""
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def _imported(path: Path, package: str) -> set[str]:
    """The vae_scale modules `path` imports anywhere in its body (first component after `vae_scale.`),
    outside an `if __name__ == "__main__":` block."""
    tree = ast.parse(path.read_text())
    tree.body = [node for node in tree.body if not _is_main_block(node)]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the kernels package
                continue
            if node.module == "vae_scale":
                out |= {a.name for a in node.names}
            elif node.module and node.module.startswith("vae_scale."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vae_scale.")}
    return out


def test_every_module_has_a_layer():
    missing = sorted(set(_package_modules()) - set(LAYERS))
    assert not missing, f"modules with no layer in tests/test_layers.py: {missing}"


def test_no_module_imports_from_a_layer_above_it():
    wrong = []
    for name, paths in sorted(_package_modules().items()):
        for path in paths:
            for dep in sorted(_imported(path, "vae_scale") - {name}):
                if dep in LAYERS and LAYERS[dep] > LAYERS[name]:
                    where = path.relative_to(ROOT)
                    wrong.append(
                        f"{name} ({where}, layer {LAYERS[name]}) imports {dep} (layer {LAYERS[dep]})"
                    )
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_kernels_import_nothing_of_vae_scale():
    for path in (ROOT / "kernels").glob("*.py"):
        assert not _imported(path, "vae_scale"), path.name


def test_the_old_top_level_kernels_name_is_not_imported():
    """`import kernels` only works from the repository root; installed, the package is vae_scale.kernels."""
    offenders = []
    for folder in ("vae_scale", "kernels", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom) and not node.level
                    else []
                )
                if any(n == "kernels" or n.startswith("kernels.") for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders
