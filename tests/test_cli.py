import subprocess
import sys

from vae_scale.cli import main


def test_info_lists_versions_backend_and_presets(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "triton", "accelerate", "webdataset", "wandb"):
        assert f"\n{name}" in out
    assert "kernels      auto -> torch on cpu" in out
    sd_line = next(line for line in out.splitlines() if line.startswith("sd-f8"))
    assert "83,653,863" in sd_line and "4 x 32 x 32" in sd_line and "f8" in sd_line


def test_console_entry_point_and_module_agree():
    # `python -m vae_scale` is the console script: exercised as a real process once.
    proc = subprocess.run(
        [sys.executable, "-m", "vae_scale", "config", "--config", "demo", "train.steps=zero"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "vae-scale config: error: train.steps expects an integer, got 'zero'"


def test_a_reader_that_goes_away_ends_the_command_quietly():
    # `vae-scale info | head -1`: the pipe closes before the command writes, as head closes it after a line.
    proc = subprocess.Popen(
        [sys.executable, "-m", "vae_scale", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, stderr
    assert stderr == ""


def test_no_command_prints_usage_and_exits_2(capsys):
    assert main([]) == 2
    assert "commands:" in capsys.readouterr().out
