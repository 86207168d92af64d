"""The one check pass before a run (vae_scale/train/checks.py): every problem found at once, each one line
naming the key or the place, before a process group starts or a file is written."""

import subprocess
import sys

from support import ROOT, TINY, env

from vae_scale.config import load_config
from vae_scale.train.checks import check_run


def test_three_independent_problems_are_reported_together_by_one_run(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    argv = [
        *TINY,
        "data.train=synthetic",
        "data.resolution=31",  # TINY's two levels downsample by 2: an odd size cannot be halved
        f"checkpoint.resume={tmp_path / 'no-such-run'}",
        f"run.dir={a_file}",  # a file where the run folder must be
    ]
    for dry_run in (["--dry-run"], []):
        proc = subprocess.run(
            [sys.executable, "-m", "vae_scale", "train", *argv, *dry_run],
            env=env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        err = proc.stderr
        assert "3 problem(s) found before step 1" in err and "Traceback" not in err, err
        problems = [line for line in err.splitlines() if line.startswith("  - ")]
        assert len(problems) == 3, err
        resolution, resume, run_dir = problems
        assert "data.resolution=31" in resolution and "downsampling factor 2" in resolution
        assert "checkpoint.resume=" in resume and "no-such-run" in resume
        assert "run.dir" in run_dir and "is a file" in run_dir
        assert a_file.read_text() == "not a folder"


def test_what_the_checks_find_is_handed_on(tmp_path):
    # model.init_from naming a run is pinned to the checkpoint found in it; a ~ in it is expanded once.
    run = tmp_path / "weights.safetensors"
    run.write_bytes(b"")
    cfg = load_config(
        None, [*TINY, "data.train=synthetic", f"run.dir={tmp_path / 'r'}", f"model.init_from={run}"]
    )
    findings = check_run(cfg, cuda=False)
    assert findings.problems == [] and findings.cfg.model.init_from == str(run)
    assert not findings.plan.enabled and findings.weights.lpips is None
    home = load_config(None, [*TINY, "data.train=synthetic", "model.init_from=~/no-such-vae"])
    (problem,) = check_run(home, cuda=False).problems
    assert problem == "model.init_from='~/no-such-vae': no such file or folder"


def test_a_compile_backend_torch_does_not_have_is_named(tmp_path):
    base = [*TINY, "data.train=synthetic", f"run.dir={tmp_path / 'r'}", "train.compile=true"]
    (problem,) = check_run(load_config(None, [*base, "train.compile_backend=inductr"]), cuda=False).problems
    assert (
        problem.startswith("train.compile_backend='inductr' is not a torch.compile backend")
        and "inductor" in problem
    )
    for backend in ("inductor", "aot_eager"):  # the default, and the debugging backend the docs name
        assert (
            check_run(load_config(None, [*base, f"train.compile_backend={backend}"]), cuda=False).problems
            == []
        )
