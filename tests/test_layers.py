"""The package's layering: every import, module-level or inside a function, points down or sideways.

A module may import from its own layer or the layers below it, never from a layer above. The table is the
architecture README.md's "Layout" describes; a new module gets a row here, or the test names it.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {
    # 0. what everything stands on: configuration, errors, file-system checks, the fused ops
    "config": 0,
    "outputs": 0,
    "kernels": 0,
    # 1. files of weights: diffusers folders and names; checkpoint folders (layout, manifest, run lock)
    "weights": 1,
    "checkpoint": 1,
    # 2. the model
    "model": 2,
    # 3. the parts of training and evaluation
    "data": 3,
    "equivariance": 3,
    "fsdp": 3,
    "image_reader": 3,
    "losses": 3,
    "metrics": 3,
    "monitor": 3,
    "preflight": 3,
    "shard_reader": 3,
    "shards": 3,
    "spectrum": 3,
    "synthetic": 3,
    "transforms": 3,
    # 4. the trainer
    "train": 4,
    # 5. the commands
    "cli": 5,
    "commands": 5,
    "compare": 5,
    "demo": 5,
    "evaluate": 5,
    "export": 5,
    "generate": 5,
    "__main__": 5,
    "__init__": 5,  # the package's convenience imports
}


def _package_modules() -> dict[str, Path]:
    modules = {p.stem: p for p in (ROOT / "vae_scale").glob("*.py")}
    modules["kernels"] = ROOT / "kernels" / "__init__.py"
    return modules


def _imported(path: Path, package: str) -> set[str]:
    """The vae_scale modules `path` imports anywhere in its body (first component after `vae_scale.`)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
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
    for name, path in sorted(_package_modules().items()):
        for dep in sorted(_imported(path, "vae_scale") - {name}):
            if dep in LAYERS and LAYERS[dep] > LAYERS[name]:
                wrong.append(f"{name} (layer {LAYERS[name]}) imports {dep} (layer {LAYERS[dep]})")
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
