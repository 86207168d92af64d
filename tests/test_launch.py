"""The launch layer: accelerate config files, the SLURM script and torchrun with restarts, run for real.

The SLURM script runs under bash with fake `srun`, `scontrol` and `accelerate` on PATH: the fake srun runs
the per-node command once per node with that node's SLURM_NODEID, as SLURM does, so a rank expanded in the
batch shell instead of on each node would show up as two nodes with rank 0.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from support import ROOT, TINY, env, free_port, kill_tree, launch_args, start

from vae_scale.formats.checkpoint import latest_checkpoint
from vae_scale.train.report import read_metrics

ACCELERATE_CONFIGS = sorted((ROOT / "launch" / "accelerate").glob("*.yaml"))
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
# The tiny model on synthetic images: what these tests launch is the point, not what it learns.
RUN = [*TINY, "data.train=synthetic"]


# --------------------------------------------------------------------------------------------------------
# accelerate config files


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_config_loads_with_accelerates_own_loader(config):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(config))  # raises on unknown keys or values
    assert cfg.compute_environment.value == "LOCAL_MACHINE"
    raw = yaml.safe_load(config.read_text())
    assert set(raw) <= set(type(cfg).__dataclass_fields__), config.name
    assert config.read_text().startswith("#"), f"{config.name} should say what it is for"


def test_the_gpu_configs_resolve_to_the_launch_they_promise(monkeypatch):
    from accelerate.utils import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    one = launch_args(ROOT / "launch/accelerate/1gpu.yaml")
    assert not (one.multi_gpu or one.use_fsdp) and one.num_processes == 1
    cmd, one_env = prepare_simple_launcher_cmd_env(one)
    assert cmd[1:] == ["-m", "vae_scale", "train"] and one_env["ACCELERATE_MIXED_PRECISION"] == "bf16"

    eight = launch_args(ROOT / "launch/accelerate/8gpu.yaml")
    assert eight.multi_gpu and eight.num_processes == 8 and eight.num_machines == 1
    eight_env = prepare_multi_gpu_env(eight)
    assert eight.nproc_per_node == "8" and eight_env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert eight.main_process_port != 0  # 0 in the file: a free port is picked

    # Multi-node: everything per job and per node comes from the command line, as train.sbatch passes it.
    with pytest.raises(ValueError, match="num_processes"):
        launch_args(ROOT / "launch/accelerate/multinode.yaml")
    by_hand = [
        "--num_machines",
        "2",
        "--num_processes",
        "16",
        "--machine_rank",
        "1",
        "--main_process_ip",
        "10.1.2.3",
        "--main_process_port",
        "29555",
    ]
    # accelerate 1.15 takes rdzv_backend only from the command line (the file's c10d is documentation).
    assert launch_args(ROOT / "launch/accelerate/multinode.yaml", *by_hand).rdzv_backend == "static"
    multi = launch_args(ROOT / "launch/accelerate/multinode.yaml", *by_hand, "--rdzv_backend", "c10d")
    prepare_multi_gpu_env(multi)
    assert (multi.nnodes, multi.nproc_per_node, multi.node_rank) == ("2", "8", 1)
    assert multi.rdzv_backend == "c10d" and multi.rdzv_endpoint == "10.1.2.3:29555"

    fsdp = launch_args(ROOT / "launch/accelerate/fsdp.yaml")
    assert fsdp.use_fsdp and fsdp.num_processes == 8
    fsdp_env = prepare_multi_gpu_env(fsdp)
    assert fsdp_env["ACCELERATE_USE_FSDP"] == "true"
    for key, value in fsdp_env.items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # what Accelerator builds from that environment; validates it
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap is None  # none named: the trainer shards the model's blocks()
    assert plugin.cpu_offload.__class__.__name__ == "OffloadPolicy"
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    # The trainer checkpoints activations itself (model.gradient_checkpointing), not through accelerate.
    assert plugin.activation_checkpointing is False


@pytest.mark.slow
def test_accelerate_launch_with_cpu_2proc_trains_two_processes(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.accelerate_cli",
        "launch",
        "--config_file",
        str(ROOT / "launch/accelerate/cpu-2proc.yaml"),
        "--main_process_port",
        str(free_port()),
        "-m",
        "vae_scale",
        "train",
        "--config",
        "demo",
        *RUN,
        "train.steps=3",
        "checkpoint.every=0",
        f"run.dir={run_dir}",
    ]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((latest_checkpoint(run_dir) / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


# --------------------------------------------------------------------------------------------------------
# SLURM


FAKE_SRUN = """
    # srun: runs the command once per node of the job, in parallel, with that node's SLURM_NODEID.
    import json, os, subprocess, sys
    argv = sys.argv[1:]
    options = []
    while argv[0].startswith("-"):
        options.append(argv.pop(0))
    with open(os.path.join(os.environ["FAKE_LOG"], "srun.json"), "w") as f:
        json.dump(options, f)
    nodes = [subprocess.Popen(argv, env={**os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i),
                                         "SLURMD_NODENAME": f"gpu-{7 + i:02d}"})
             for i in range(int(os.environ["SLURM_NNODES"]))]
    sys.exit(max(p.wait() for p in nodes))
"""

FAKE_SCONTROL = """
    import os, signal, sys
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # a C program's default: `| head -n1` ends it quietly
    if sys.argv[1:3] == ["show", "hostnames"]:
        assert sys.argv[3] == "gpu-[07-08]", sys.argv
        print("gpu-07\\ngpu-08")
    elif sys.argv[1] == "requeue":
        with open(os.path.join(os.environ["FAKE_LOG"], "requeue"), "a") as f:
            f.write(sys.argv[2] + "\\n")
    else:
        sys.exit(f"fake scontrol: {sys.argv}")
"""

# The per-node launcher. With FAKE_PREEMPT it plays SLURM's SIGUSR1 at the time limit: it starts a "worker"
# (a child that, like the trainer, installs a SIGUSR1 handler that saves and exits 0), then signals the
# node shell and itself. A launcher not started with SIGUSR1 ignored dies here (exit -10), as accelerate's
# would.
FAKE_ACCELERATE = """
    import json, os, signal, subprocess, sys, time
    log = os.environ["FAKE_LOG"]
    node = os.environ["SLURM_NODEID"]
    keep = ("OMP_NUM_THREADS", "NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING")
    with open(os.path.join(log, f"accelerate-{node}.json"), "w") as f:
        json.dump({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in keep}}, f)
    if not os.environ.get("FAKE_PREEMPT"):
        sys.exit(int(os.environ.get("FAKE_RC", "0")))
    ready = os.path.join(log, f"worker-{node}.ready")
    worker = subprocess.Popen([sys.executable, "-c", f'''
    import signal, sys, time
    def save_and_exit(signum, frame):
        open({os.path.join(log, f"worker-{node}.saved")!r}, "w").close()
        sys.exit(0)
    signal.signal(signal.SIGUSR1, save_and_exit)
    open({ready!r}, "w").close()
    time.sleep(5)
    sys.exit(1)  # never signalled
    '''])
    while not os.path.exists(ready) and worker.poll() is None:
        time.sleep(0.01)
    os.kill(os.getppid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGUSR1)
    rc = worker.wait()
    sys.exit(rc or int(os.environ.get("FAKE_RC", "0")))
"""


def fake_tools(folder: Path, **scripts: str) -> Path:
    """Executable Python scripts named after the tools they stand in for (srun, scontrol, accelerate)."""
    folder.mkdir()
    for name, body in scripts.items():
        (folder / name).write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
        (folder / name).chmod(0o755)
    return folder


def run_sbatch(tmp_path: Path, args: list[str], **extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Run train.sbatch under bash as SLURM would on the head node of a two-node job, fakes on PATH."""
    bin_dir = fake_tools(tmp_path / "bin", srun=FAKE_SRUN, scontrol=FAKE_SCONTROL, accelerate=FAKE_ACCELERATE)
    log = tmp_path / "log"
    log.mkdir()
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-[07-08]",
        "SLURM_NODEID": "0",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_CPUS_ON_NODE": "32",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "FAKE_LOG": str(log),
    }
    e = {**env(**slurm, **extra), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for key in (
        "OMP_NUM_THREADS",
        "GPUS_PER_NODE",
        "MAIN_PROCESS_IP",
        "MAIN_PROCESS_PORT",
        "NCCL_DEBUG",
        "VAE_SCALE_ACCELERATE_CONFIG",
        "VAE_SCALE_PREEMPT_FLAG",
    ):
        e.pop(key, None)
    proc = start(["bash", str(SBATCH), *args], e, cwd=tmp_path)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        kill_tree(proc)  # the fakes too, not just bash
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), log


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_sbatch_gives_each_node_its_own_machine_rank_and_one_head_address(tmp_path):
    trainer_args = [
        "--config",
        "sd-f8",
        "data.train=/data/train-{000000..000999}.tar",
        "run.name=a b",
        "train.mixed_precision=bf16",
    ]
    proc, log = run_sbatch(tmp_path, trainer_args)
    assert proc.returncode == 0, proc.stderr
    calls = {n: json.loads((log / f"accelerate-{n}.json").read_text()) for n in (0, 1)}
    for node, call in calls.items():
        argv = call["argv"]
        assert argv[0] == "launch"
        assert option(argv, "--machine_rank") == str(node)
        assert option(argv, "--main_process_ip") == "gpu-07"
        assert option(argv, "--main_process_port") == str(20000 + 4242 % 20000)
        assert option(argv, "--num_machines") == "2" and option(argv, "--num_processes") == "8"
        assert option(argv, "--config_file") == "launch/accelerate/multinode.yaml"
        assert option(argv, "--rdzv_backend") == "c10d"
        assert argv[argv.index("-m") :] == ["-m", "vae_scale", "train", *trainer_args]  # quoting intact
        assert call["env"] == {
            "OMP_NUM_THREADS": "8",
            "NCCL_DEBUG": "WARN",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
            "NCCL_ASYNC_ERROR_HANDLING": "1",
        }
    srun = json.loads((log / "srun.json").read_text())
    assert "--ntasks-per-node=1" in srun and "--nodes=2" in srun
    assert not (log / "requeue").exists()
    sbatch_lines = SBATCH.read_text().splitlines()
    for directive in ("--signal=USR1@120", "--requeue", "--ntasks-per-node=1"):
        assert f"#SBATCH {directive}" in sbatch_lines


def test_sbatch_requeues_itself_after_sigusr1_stops_training_cleanly(tmp_path):
    proc, log = run_sbatch(tmp_path, ["--config", "sd-f8", "run.name=x"], FAKE_PREEMPT="1")
    assert proc.returncode == 0, proc.stderr
    assert (log / "worker-0.saved").exists() and (log / "worker-1.saved").exists()  # the signal reached them
    assert (log / "requeue").read_text() == "4242\n"  # once, for the job
    assert "requeueing job 4242" in proc.stderr
    assert not list(tmp_path.glob(".vae-scale-usr1-*"))


def test_sbatch_does_not_requeue_a_step_that_failed(tmp_path):
    proc, log = run_sbatch(tmp_path, ["--config", "sd-f8", "run.name=x"], FAKE_PREEMPT="1", FAKE_RC="3")
    assert proc.returncode == 3
    assert not (log / "requeue").exists()


def start_sbatch_cpu(tmp_path: Path, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
    """The real train.sbatch, as SLURM would run it for a one-node job of 2 processes, with the real
    accelerate launch (on gloo) under the fake srun; `name` keeps each job's files apart."""
    bin_dir = fake_tools(tmp_path / f"bin-{name}", srun=FAKE_SRUN, scontrol=FAKE_SCONTROL)
    log = tmp_path / f"log-{name}"
    log.mkdir()
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "gpu-07",
        "SLURM_NODEID": "0",
        "SLURM_GPUS_ON_NODE": "2",
        "SLURM_CPUS_ON_NODE": "2",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "FAKE_LOG": str(log),
        "MAIN_PROCESS_IP": "127.0.0.1",
        "MAIN_PROCESS_PORT": str(free_port()),
        "VAE_SCALE_ACCELERATE_CONFIG": str(ROOT / "launch/accelerate/cpu-2proc.yaml"),
        "VAE_SCALE_PREEMPT_FLAG": str(tmp_path / f".preempt-{name}"),
    }
    e = {**env(**slurm), "PATH": f"{bin_dir}{os.pathsep}{env()['PATH']}"}
    e.pop("OMP_NUM_THREADS")  # the script sets it: 2 CPUs / 2 processes
    return start(["bash", str(SBATCH), *args], e, cwd=tmp_path), log


SBATCH_RUN = ["--config", "demo", *RUN, "train.steps=40", "checkpoint.every=0", "optim.ema_decay=0.5"]


@pytest.fixture(scope="module")
def sbatch_straight(tmp_path_factory) -> Path:
    """An uninterrupted 2-process job of SBATCH_RUN through train.sbatch: what interrupted ones must equal."""
    tmp = tmp_path_factory.mktemp("sbatch-straight")
    proc, _ = start_sbatch_cpu(tmp, "straight", [*SBATCH_RUN, f"run.dir={tmp / 'run'}"])
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, err[-3000:]
    return tmp / "run"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_to_every_process_of_a_two_process_job_saves_once_and_exits_0(
    tmp_path, sbatch_straight, sig
):
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    proc, log = start_sbatch_cpu(tmp_path, "interrupted", [*SBATCH_RUN, f"run.dir={run_dir}"])
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not any(r["step"] >= 3 for r in read_metrics(run_dir)):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        trainers = [
            p for p in tree if "vae_scale" in p.cmdline() and {"bash", "launch"}.isdisjoint(p.cmdline())
        ]
        assert len(trainers) == 2, [p.cmdline()[:6] for p in tree]
        # Every process of the job as SLURM signals them: --signal=USR1@120 reaches the job step (the node
        # shell, the launcher, the trainers), SIGTERM/SIGINT the batch shell as well. The fake srun aside:
        # the real one is SLURM's own.
        step = [p for p in tree[1:] if not p.cmdline()[1].endswith("srun")]
        for p in step if sig == signal.SIGUSR1 else [tree[0], *step]:
            p.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    requeued = (log / "requeue").read_text() if (log / "requeue").exists() else ""
    assert requeued == ("4242\n" if sig == signal.SIGUSR1 else "")  # only "save and come back" requeues
    (saved,) = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-")]
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and 3 <= state["step"] < 40
    ranks = [json.loads((saved / f"rank-{r}.json").read_text())["weights_fingerprint"] for r in (0, 1)]
    assert ranks[0] == ranks[1]
    if sig != signal.SIGUSR1:
        return
    # The requeued job: the same command again resumes and ends where an uninterrupted job does.
    proc, _ = start_sbatch_cpu(tmp_path, "requeued", [*SBATCH_RUN, f"run.dir={run_dir}"])
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, err[-3000:]
    assert latest_checkpoint(run_dir).name == "step-000000040"
    for file in ("vae.safetensors", "ema.safetensors"):
        a = load_file(latest_checkpoint(sbatch_straight) / file)
        b = load_file(latest_checkpoint(run_dir) / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


# --------------------------------------------------------------------------------------------------------
# torchrun


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_the_run_resumes_from_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    steps = 40
    args = [
        "--config",
        "demo",
        *RUN,
        f"train.steps={steps}",
        "checkpoint.every=5",
        "checkpoint.keep=3",
        f"run.dir={run_dir}",
    ]
    proc = start(["bash", str(TORCHRUN_SH), *args], env(NPROC_PER_NODE="2", MAX_RESTARTS="1"))
    try:
        deadline = time.time() + 120
        while latest_checkpoint(run_dir) is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "torchrun ended before the first checkpoint"
        killed_after = int(latest_checkpoint(run_dir).name.split("-")[1])
        workers = [p for p in psutil.Process(proc.pid).children() if "vae_scale" in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        workers[-1].send_signal(signal.SIGKILL)
        assert read_metrics(run_dir)[-1]["step"] < steps, "the run finished before the kill: slow it down"
        out, err = proc.communicate(timeout=150)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, err[-3000:]
    assert latest_checkpoint(run_dir).name == f"step-{steps:09d}"
    resumed = re.search(r"resumed from \S+ at step (\d+)", out + err)
    assert resumed, "the restarted workers did not resume from a checkpoint"
    resumed_at = int(resumed.group(1))
    assert resumed_at % 5 == 0 and killed_after <= resumed_at < steps
    logged = [r["step"] for r in read_metrics(run_dir)]
    assert logged[-(steps - resumed_at) :] == list(range(resumed_at + 1, steps + 1))
    assert set(logged) == set(range(1, steps + 1))


# --------------------------------------------------------------------------------------------------------
# A stop signal during an evaluation


@pytest.mark.slow
def test_a_stop_signal_during_evaluation_saves_within_a_batch_not_after_the_evaluation(tmp_path):
    from support import accelerate_launch, photo_like_shards

    # 160 validation images, 80 per rank in 20 batches of 4, each with 12 importance samples: an evaluation
    # of seconds, next to training steps of milliseconds.
    shards = photo_like_shards(tmp_path / "data", 200, max_per_shard=40, val_fraction=0.8)
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        f"data.train={shards}",
        f"data.val={shards}",
        f"run.dir={run_dir}",
        "train.steps=1000",
        "checkpoint.every=0",
        "eval.every=3",
        "loss.recon=gaussian",
        "eval.metrics=[psnr,bpd]",
        "eval.iw=12",
    ]
    proc = start(accelerate_launch("cpu-2proc.yaml", 2, args))
    try:
        deadline = time.time() + 240

        def rows_at(step: int) -> list[dict]:
            while not any(r["step"] == step for r in read_metrics(run_dir)):
                assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
                time.sleep(0.01)
            return [r for r in read_metrics(run_dir) if r["step"] == step]

        # The first evaluation runs whole: its duration is the time between step 3's row and its val row.
        while len(rows_at(3)) < 2:
            time.sleep(0.01)
        train_row, val_row = rows_at(3)
        evaluation = val_row["time"] - train_row["time"]
        assert evaluation > 2.0, f"the evaluation took {evaluation:.2f} s: too short to measure against"
        # Step 6's row is written just before its evaluation starts; a tenth of an evaluation later, the
        # signal lands inside it. Only rank 1 is signalled: rank 0 must learn it from the agreement.
        rows_at(6)
        time.sleep(0.1 * evaluation)
        tree = psutil.Process(proc.pid).children(recursive=True)
        trainers = sorted((p for p in tree if "vae_scale" in p.cmdline()), key=lambda p: p.pid)
        assert len(trainers) == 2, [p.cmdline()[:6] for p in tree]
        rank1 = next(p for p in trainers if p.environ().get("RANK") == "1")
        rank1.send_signal(signal.SIGUSR1)
        signalled = time.time()
        while latest_checkpoint(run_dir) is None:
            assert time.time() < deadline, "no checkpoint was saved"
            time.sleep(0.005)
        saved_after = time.time() - signalled
        out, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    # Had the evaluation run to its end, the save would come at least 0.9 of an evaluation after the
    # signal (it arrived 0.1 in). Stopping between batches, it comes one batch (1/20 of the evaluation)
    # plus the checkpoint's write (about a second for this model on a loaded CPU) after it: half an
    # evaluation separates the two. On a loaded 2-core Xeon: 1.6 s after the signal in an evaluation of
    # 10.2 s; with the evaluation left to finish, 5.8 s of 6.4 s.
    assert saved_after < 0.5 * evaluation, (saved_after, evaluation)
    assert "eval        step 6: stopped after" in out + err
    assert not any(r["step"] == 6 and "val/psnr" in r for r in read_metrics(run_dir))  # nothing half-logged
    (saved,) = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-")]
    state = json.loads((saved / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 2
    ranks = [json.loads((saved / f"rank-{r}.json").read_text())["weights_fingerprint"] for r in (0, 1)]
    assert ranks[0] == ranks[1]
