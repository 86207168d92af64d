"""The built wheel: the Triton kernels install as `vae_scale.kernels` (a top-level `kernels` would overwrite,
or be overwritten by, the PyPI package of that name), and every package of the tree is in it."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the tree (building in place would leave build/ behind)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("vae_scale", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out)]
    done = subprocess.run([*cmd, str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (whl,) = out.glob("vae_scale-*.whl")
    return whl


def test_the_wheel_has_no_top_level_kernels(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"vae_scale"}, tops
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["vae_scale"]
    for module in sorted(p.name for p in (ROOT / "kernels").glob("*.py")):
        assert f"vae_scale/kernels/{module}" in names, module


def test_every_package_of_the_tree_is_in_the_wheel(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = [p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "vae_scale").rglob("__init__.py")]
    missing = [p for p in packages if f"{p}/__init__.py" not in names]
    assert not missing, f"not in the wheel (pyproject.toml's [tool.setuptools] packages): {missing}"
    configs = {p.name for p in (ROOT / "vae_scale" / "configs").glob("*.yaml")}
    assert configs and all(f"vae_scale/configs/{c}" in names for c in configs)


def test_the_installed_wheel_imports_its_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    code = (
        "import importlib.util, vae_scale.models.sd\n"
        "from vae_scale import kernels\n"
        "print(kernels.__file__)\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else None)\n"
    )
    # Only the installed copy on the path ahead of site-packages; run outside the repository.
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"}
    done = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r})\n{code}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    kernels_file, top_kernels = done.stdout.split()
    assert Path(kernels_file).is_relative_to(target / "vae_scale" / "kernels")
    assert top_kernels == "None" or not Path(top_kernels).is_relative_to(target)
