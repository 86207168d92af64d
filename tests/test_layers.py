"""The package's layering: every import, module-level or inside a function, points down or sideways.

A module may import from its own layer or the layers below it, never from a layer above. A module's layer is
that of the longest entry of LAYERS its dotted name starts with: a folder is one layer (a new file in
vae_scale/models/ is a model module), with the trainer and what assembles it one layer above the parts it
assembles. docs/design.md's "Layout" describes the same table. The body of an `if __name__ == "__main__":`
block is left out: it runs only when the module is the program, never when something imports the module.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS = {
    # 0. what everything stands on: configuration, files and disk space, the fused ops
    "config": 0,
    "config_reference": 0,
    "config_values": 0,  # below config.py: YAML, presets, overrides, coercion, range checks
    "configs": 0,  # the presets' YAML files
    "files": 0,
    "kernels": 0,
    # 1. files of weights: diffusers folders and names; checkpoint folders (layout, manifest, run lock)
    "formats": 1,
    # 2. the model families, their layers, the posterior, tiling
    "models": 2,
    # 3. data: the shard format, the loader, the readers of the inference commands
    "data": 3,
    # 4. evaluation: metrics, likelihoods, LPIPS, spectra, equivariance, the probe
    "eval": 4,
    # 5. the parts of training: objective, discriminator, EMA, FSDP, checkpoints, checks, logging, signals
    "train": 5,
    # 6. the trainer, and what builds its parts from the config
    "train.build": 6,
    "train.trainer": 6,
    "train.recovery": 6,  # the trainer's saving, restoring and rolling back
    # 7. the commands: what each does, as functions a Python user calls
    "commands": 7,
    "__init__": 7,  # the package's convenience imports
    # 8. the command line: every command's flags, parsed and checked, then the functions above called
    "cli": 8,
    "__main__": 8,
}


def _layer(module: str) -> int | None:
    """The layer of a dotted module name relative to vae_scale: its longest prefix in LAYERS."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def _package_modules() -> dict[str, Path]:
    """Dotted module name relative to vae_scale (a package's __init__ by the package's name) -> its file."""
    modules = {}
    for path in sorted((ROOT / "vae_scale").rglob("*.py")):
        parts = list(path.relative_to(ROOT / "vae_scale").with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        modules[".".join(parts)] = path
    modules["kernels"] = ROOT / "kernels" / "__init__.py"
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


def _imported(path: Path) -> set[str]:
    """The vae_scale modules `path` imports anywhere in its body, as dotted names relative to vae_scale
    (`from vae_scale.train import objective` gives train.objective), outside an `if __name__ ==
    "__main__":` block."""
    tree = ast.parse(path.read_text())
    tree.body = [node for node in tree.body if not _is_main_block(node)]
    known = _package_modules()
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the kernels package
                continue
            if node.module == "vae_scale" or (node.module or "").startswith("vae_scale."):
                base = node.module.removeprefix("vae_scale").lstrip(".")
                for a in node.names:
                    sub = f"{base}.{a.name}" if base else a.name
                    out.add(sub if sub in known else base)
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("vae_scale.") for a in node.names if a.name.startswith("vae_scale.")}
    return out - {""}


def test_every_module_has_a_layer():
    missing = sorted(m for m in _package_modules() if _layer(m) is None)
    assert not missing, f"modules with no layer in tests/test_layers.py: {missing}"


def test_no_module_imports_from_a_layer_above_it():
    wrong = []
    for name, path in sorted(_package_modules().items()):
        for dep in sorted(_imported(path) - {name}):
            if _layer(dep) is not None and _layer(dep) > _layer(name):
                where = path.relative_to(ROOT)
                wrong.append(f"{name} ({where}, layer {_layer(name)}) imports {dep} (layer {_layer(dep)})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_a_folder_is_one_concern():
    """Only the foundation (layer 0) lives loose in vae_scale/ beside __init__ and __main__: every other
    module is in the folder of its concern."""
    loose = [
        p.name
        for p in (ROOT / "vae_scale").glob("*.py")
        if p.stem not in ("__init__", "__main__") and _layer(p.stem) != 0
    ]
    assert not loose, f"modules outside the folders of their concern: {loose}"


def test_the_kernels_import_nothing_of_vae_scale():
    for path in (ROOT / "kernels").glob("*.py"):
        assert not _imported(path), path.name


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
