"""Launching: the slurm script's dry run (layout, batch arithmetic, per-GPU parameters and the
exact command), the plan for a pipelined layout, flag errors that name the flag, and the
quickstart end to end (slow)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(ROOT, "slurm", "pretrain_lm2_1p7b.sh")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def test_slurm_dry_run_prints_layout_and_command():
    from megatron_lm2.accounting import flops_per_token, num_parameters
    from megatron_lm2.flavors import get_flavor

    result = subprocess.run(
        ["bash", SLURM, "--dry-run"], capture_output=True, text=True, timeout=300,
        env=_env(NODES="4", TP="2", DATA_PATH="/data/lm2/shards", CHECKPOINT_DIR="/ckpt/lm2"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(None, 1) for line in result.stdout.strip().splitlines())
    # torchrun forwards SIGUSR1 only through its own flag's env var; the dry run prints what the
    # launch section exports.
    env = dict(item.split("=", 1) for item in lines["env"].split())
    assert {k: env[k] for k in ("PET_SIGNALS_TO_HANDLE", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")} == dict(
        PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="110")
    script = open(SLURM).read()
    launch = script[script.index("# ---- launch and requeue"):]
    for name, value in env.items():  # every printed variable is one the launch exports
        assert f"\nexport {name}=" in launch or f"\nexport {name} " in launch or f" {name}\n" in launch, name
    assert "TORCHELASTIC_SIGNALS_TO_HANDLE=" not in script  # torchrun overwrites it
    # Outside an allocation the rendezvous is not made up (no 127.0.0.1): placeholders.
    assert env["MASTER_ADDR"] == "<first-node-of-SLURM_JOB_NODELIST>" and "127.0.0.1" not in result.stdout
    # 4 nodes x 8 GPUs, TP 2 -> DP 16; global 256 = micro 4 x 4 micro-batches x 16.
    assert lines["layout"] == "4 nodes x 8 GPUs = 32 | TP 2 PP 1 DP 16"
    assert lines["batch"] == ("micro 4 x 4 micro-batches x DP 16 = global 256 sequences = "
                              f"{256 * 2048:,} tokens/step")
    config = get_flavor("lm2-1.7b")
    total = num_parameters(config).total
    # PP 1: every GPU holds 1/TP of the whole model.
    per_gpu = -(-total // 2)
    assert f"{total / 1e9:.3f}B parameters" in lines["model"]
    assert f"{per_gpu / 1e6:.1f}M per GPU" in lines["model"]
    assert f"{flops_per_token(config) / 1e9:.2f} GFLOP/token" in lines["model"]
    # bf16 weights 2 B, fp32 grads 4 B, distributed optimizer 12 B / DP per parameter.
    gib = 1024 ** 3
    assert lines["memory/GPU"].startswith(
        f"weights {per_gpu * 2 / gib:.2f} + grads {per_gpu * 4 / gib:.2f} + optimizer {per_gpu * 12 / 16 / gib:.2f}")
    assert lines["memory/GPU"].endswith("of 80 GiB (H100): fits")
    command = lines["command"]
    assert command.startswith(
        "torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint ${MASTER_ADDR}:${MASTER_PORT} "
        "--rdzv-id ${SLURM_JOB_ID} -m megatron_lm2.train --flavor lm2-1.7b --seq-length 2048 "
        "--bf16 --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 "
        "--micro-batch-size 4 --global-batch-size 256 --train-iters 100000 --lr 2e-4 --min-lr 2e-5 "
        "--lr-warmup-iters 700 --lr-decay-style cosine --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 "
        "--clip-grad 1.0 --seed 1234 --data-path /data/lm2/shards")
    assert "--save /ckpt/lm2 --save-interval 500 --keep-last 3" in command
    assert "--dry-run" not in command and "--nodes" not in command


def test_plan_for_a_pipelined_layout():
    from megatron_lm2.accounting import block_parameters, memory_parameters
    from megatron_lm2.training.config import parse_args
    from megatron_lm2.training.plan import make_plan

    train = parse_args(["--dry-run", "--flavor", "lm2-1.7b-mem6", "--nodes", "2", "--gpus-per-node", "8",
                        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                        "--micro-batch-size", "2", "--global-batch-size", "64", "--bf16"])
    plan = make_plan(train)
    assert (plan.world_size, plan.tp, plan.pp, plan.dp) == (16, 2, 2, 4)
    assert plan.num_microbatches == 64 // (2 * 4)
    config = train.model_config()
    d, vocab = config.hidden_size, config.vocab_size
    # Stage 0: blocks 1-8 (memory in 1-6) + embedding; stage 1: blocks 9-16 + output + norm.
    first = 8 * block_parameters(config) + 6 * memory_parameters(config) + vocab * d
    last = 8 * block_parameters(config) + vocab * d + d
    assert plan.parameters_per_gpu == -(-max(first, last) // 2)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--micro-batch-size", "0"], "argument --micro-batch-size: must be > 0, got 0"),
        (["--tensor-model-parallel-size", "two"], "argument --tensor-model-parallel-size: expected int, got 'two'"),
        (["--lr", "-1"], "argument --lr: must be > 0, got -1"),
        (["--dataloader", "torch"], "argument --dataloader: invalid choice: 'torch'"),
        (["--global-batch-size", "10", "--micro-batch-size", "4"],
         "--global-batch-size 10 is not a multiple of --micro-batch-size 4"),
        (["--flavor", "lm2-2b"], "--flavor 'lm2-2b': known flavors are"),
        (["--memory-chunk-size", "1000"], "--memory-chunk-size=1000 does not divide --seq-length=2048"),
        (["--min-lr", "1e-3"], "--min-lr 0.001 is larger than --lr 0.0002"),
        (["--split", "98,2"], "--split '98,2': expected three non-negative numbers"),
        (["--tensor-model-parallel-size", "3"], "world size 8 is not divisible by --tensor-model-parallel-size 3"),
    ],
)
def test_bad_flag_values_name_the_flag(argv, message, capsys):
    from megatron_lm2.training.config import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--mock-data", *argv], world_size=8)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_reports_bad_flag_and_exits_2():
    result = subprocess.run([sys.executable, "-m", "megatron_lm2.train", "--mock-data", "--global-batch-size", "0"],
                            capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 2
    assert "lm2-train: error: argument --global-batch-size: must be > 0, got 0" in result.stderr


def test_megatron_style_flags_exist():
    from megatron_lm2.training.config import build_parser

    flags = {option for action in build_parser()._actions for option in action.option_strings}
    for name in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--micro-batch-size",
                 "--global-batch-size", "--seq-length", "--train-iters", "--lr", "--min-lr", "--lr-warmup-iters",
                 "--weight-decay", "--clip-grad", "--bf16", "--fp8-format", "--save", "--load", "--save-interval",
                 "--keep-last", "--log-interval", "--eval-interval", "--data-path", "--blend-file", "--mock-data",
                 "--dataloader", "--flavor", "--seed", "--tensorboard-dir", "--wandb-project",
                 "--memory-chunk-size", "--dry-run", "--nodes", "--gpus-per-node"):
        assert name in flags, name


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    """The README's first command, shortened to 10 steps (the full run is ~5 minutes)."""
    out = tmp_path / "quickstart"
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "examples", "quickstart.sh")], capture_output=True, text=True, timeout=900,
        env=_env(LM2_PYTHON=sys.executable, LM2_QUICKSTART_DIR=str(out), LM2_QUICKSTART_STEPS="10",
                 LM2_QUICKSTART_STORIES="2", LM2_QUICKSTART_MEMORY_STEPS="10"))
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert (out / "loss.png").stat().st_size > 10_000
    assert (out / "checkpoints" / "latest").read_text().strip() == "iter_0000010"
    assert "[quickstart] done" in result.stdout
    # It walks the whole stack: the HF export, loaded by transformers, answered every question
    # of the held-out stories, and the memory picture was drawn.
    import importlib.util
    import json

    from megatron_lm2.data.synthetic_corpus import PEOPLE, PLACES

    spec = importlib.util.spec_from_file_location("quickstart_check", os.path.join(ROOT, "examples", "quickstart_check.py"))
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    story_and_questions = check.story_and_questions

    assert (out / "hf" / "config.json").exists()
    assert "[hf] greedy continuation:" in result.stdout
    recall = json.loads((out / "recall.json").read_text())
    questions = [q for i in range(2) for q in story_and_questions(i)[1]]
    chance = sum(1 / (len(PLACES) if q.question.startswith("Where") else len(PEOPLE) + 1) for q in questions)
    assert recall["questions"] == len(questions) == 8
    assert abs(recall["chance"] - chance / len(questions)) < 1e-12
    assert 0.0 <= recall["accuracy"] <= 1.0 and recall["accuracy"] * 8 == round(recall["accuracy"] * 8)
    for picture in ("read_attention.png", "gates.png"):
        assert (out / "memory" / picture).stat().st_size > 10_000
    # Step 8/8, the fact beyond the window (10 steps here: the targets are checked from 100 steps,
    # benchmarks/memory_experiment.md): both twins trained on the same task and were evaluated.
    fact = json.loads((out / "fact" / "runs.json").read_text())["runs"]
    assert sorted(r["flavor"] for r in fact) == ["debug-vanilla", "lm2-debug"]
    for run in fact:
        assert run["settings"]["steps"] == 10 and run["settings"]["window"] == 32
        assert [step for step, _ in run["curve"]][-1] == 10
        n, chance = run["settings"]["eval_samples"], 1 / run["settings"]["values"]
        assert run["curve"][0][1] <= chance + 4 * (chance * (1 - chance) / n) ** 0.5  # untrained: no recall
    assert (out / "fact" / "read_attention.png").stat().st_size > 10_000


def _fake_slurm(bin_dir, log):
    """Stand-ins for srun / scontrol / scancel that record what the batch script asks for; the
    fake srun plays the training step and exits when it receives SIGUSR1."""
    scripts = {
        "srun": f'echo "srun $*" >> {log}\necho $$ > {bin_dir}/step.pid\n'
                f'trap \'echo "step got USR1" >> {log}; exit 0\' USR1\nwhile true; do sleep 0.05; done\n',
        "scontrol": f'if [ "$1" = show ]; then echo node001; echo node002; else echo "scontrol $*" >> {log}; fi\n',
        "scancel": f'echo "scancel $*" >> {log}\nkill -USR1 "$(cat {bin_dir}/step.pid)"\n',
    }
    for name, body in scripts.items():
        path = os.path.join(bin_dir, name)
        with open(path, "w") as handle:
            handle.write("#!/bin/bash\n" + body)
        os.chmod(path, 0o755)


def test_slurm_script_forwards_usr1_and_requeues(tmp_path):
    import signal
    import time

    bin_dir, log = str(tmp_path / "bin"), str(tmp_path / "calls.log")
    os.makedirs(bin_dir)
    _fake_slurm(bin_dir, log)
    env = _env(SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[001-002]",
               DATA_PATH="/data/shards", CHECKPOINT_DIR=str(tmp_path / "ckpt"))
    env["PATH"] = bin_dir + os.pathsep + env["PATH"]
    script = subprocess.Popen(["bash", SLURM], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(bin_dir, "step.pid")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    script.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` delivers
    output, _ = script.communicate(timeout=60)
    assert script.returncode == 0, output
    calls = open(log).read().splitlines()
    assert calls[0].startswith(
        "srun --kill-on-bad-exit=1 --ntasks-per-node=1 torchrun --nnodes 2 --nproc-per-node 8 "
        "--rdzv-backend c10d --rdzv-endpoint node001:15042 --rdzv-id 42 -m megatron_lm2.train --flavor lm2-1.7b")
    assert calls[1:] == ["scancel --signal=USR1 42", "step got USR1", "scontrol requeue 42"]


LAUNCH_ENV_DEFAULTS = dict(
    CUDA_DEVICE_MAX_CONNECTIONS="1", PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True",
    TORCH_NCCL_ASYNC_ERROR_HANDLING="1", NCCL_IB_TIMEOUT="22", NCCL_DEBUG="WARN",
    PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="110")


def _dry_run_in_allocation(tmp_path, **extra):
    bin_dir, log = str(tmp_path / "bin"), str(tmp_path / "calls.log")
    os.makedirs(bin_dir, exist_ok=True)
    _fake_slurm(bin_dir, log)
    env = _env(SLURM_JOB_ID="123456", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[001-002]",
               DATA_PATH="/data/shards", CHECKPOINT_DIR=str(tmp_path / "ckpt"),
               MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", **extra)  # what a submitting shell may export
    env["PATH"] = bin_dir + os.pathsep + env["PATH"]
    result = subprocess.run(["bash", SLURM, "--dry-run"], cwd=str(tmp_path), env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(None, 1) for line in result.stdout.strip().splitlines())
    return dict(item.split("=", 1) for item in lines["env"].split()), lines


def test_slurm_dry_run_in_an_allocation_prints_the_rendezvous_and_env(tmp_path):
    """Inside an allocation (fake SLURM_* and scontrol): MASTER_ADDR is the first node whatever
    the environment says, the port is 15000 + job id % 15000, srun starts one torchrun per node
    with the c10d rendezvous there, and the NCCL/allocator variables have their defaults, each
    overridable from the environment."""
    env, lines = _dry_run_in_allocation(tmp_path)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("node001", str(15000 + 123456 % 15000))
    assert {k: env[k] for k in LAUNCH_ENV_DEFAULTS} == LAUNCH_ENV_DEFAULTS
    assert lines["launch"].startswith(
        "srun --kill-on-bad-exit=1 --ntasks-per-node=1 torchrun --nnodes 2 --nproc-per-node 8 "
        f"--rdzv-backend c10d --rdzv-endpoint node001:{15000 + 123456 % 15000} --rdzv-id 123456 "
        "-m megatron_lm2.train --flavor lm2-1.7b")
    assert lines["layout"] == "2 nodes x 8 GPUs = 16 | TP 1 PP 1 DP 16"
    assert not os.path.exists(tmp_path / "ckpt")  # a dry run creates nothing
    overridden, _ = _dry_run_in_allocation(tmp_path, NCCL_IB_TIMEOUT="20", NCCL_DEBUG="INFO",
                                           PYTORCH_CUDA_ALLOC_CONF="expandable_segments:False")
    assert (overridden["NCCL_IB_TIMEOUT"], overridden["NCCL_DEBUG"], overridden["PYTORCH_CUDA_ALLOC_CONF"]) == (
        "20", "INFO", "expandable_segments:False")
    assert overridden["MASTER_ADDR"] == "node001"


def test_slurm_output_goes_to_a_folder_that_exists():
    """slurm does not create --output's folder: the script's is the submit dir itself."""
    script = open(SLURM).read()
    outputs = [line for line in script.splitlines() if line.startswith("#SBATCH --output=")]
    assert outputs == ["#SBATCH --output=%x-%j.out"]


def test_slurm_script_outside_an_allocation_refuses_to_guess_the_rendezvous(tmp_path):
    result = subprocess.run(["bash", SLURM], cwd=str(tmp_path), capture_output=True, text=True, timeout=60,
                            env=_env(DATA_PATH="/data/shards", CHECKPOINT_DIR=str(tmp_path / "ckpt")))
    assert result.returncode == 2 and "submit with sbatch" in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "ckpt")


_WORKER = """
import os, signal, sys, time
out = sys.argv[1]
signal.signal(signal.SIGUSR1, lambda *_: (open(out + "/got_usr1", "w").close(), sys.exit(0)))
with open(out + "/worker.pid.tmp", "w") as handle:
    handle.write(str(os.getpid()))
os.replace(out + "/worker.pid.tmp", out + "/worker.pid")
deadline = time.time() + 60
while time.time() < deadline:
    time.sleep(0.05)
"""


def _torchrun_usr1(tmp_path, signals):
    """Start a real torchrun (1 CPU worker whose SIGUSR1 handler writes a file), send torchrun
    SIGUSR1, and return (worker got it, torchrun's exit status, worker alive after torchrun)."""
    import signal
    import time

    tmp_path.mkdir()
    (tmp_path / "worker.py").write_text(_WORKER)
    env = _env(OMP_NUM_THREADS="1")
    env.pop("PET_SIGNALS_TO_HANDLE", None)
    env.pop("TORCHELASTIC_SIGNALS_TO_HANDLE", None)
    if signals:
        env["PET_SIGNALS_TO_HANDLE"] = signals
    log = tmp_path / "torchrun.log"  # a file, not a pipe: an orphaned worker would hold a pipe open
    with open(log, "w") as handle:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
             str(tmp_path / "worker.py"), str(tmp_path)],
            env=env, stdout=handle, stderr=subprocess.STDOUT)
    pid_file, worker = tmp_path / "worker.pid", None
    try:
        deadline = time.time() + 120
        while not pid_file.exists() and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.05)
        assert pid_file.exists(), log.read_text()[-3000:]
        worker = int(pid_file.read_text())
        launcher.send_signal(signal.SIGUSR1)
        launcher.wait(timeout=60)
        time.sleep(0.5)
        try:
            os.kill(worker, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        return (tmp_path / "got_usr1").exists(), launcher.returncode, alive
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if worker is not None:
            try:
                os.kill(worker, signal.SIGKILL)  # the orphan, if torchrun left one
            except ProcessLookupError:
                pass


def test_torchrun_forwards_usr1_only_with_pet_signals_to_handle(tmp_path):
    """What the slurm script relies on: with PET_SIGNALS_TO_HANDLE naming SIGUSR1 a real
    torchrun forwards it to its worker; with torchrun's default list SIGUSR1 kills torchrun and
    the worker is orphaned, its handler never run (nothing would be saved)."""
    import signal

    got, _, alive = _torchrun_usr1(tmp_path / "pet", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    assert got and not alive
    got, status, alive = _torchrun_usr1(tmp_path / "default", None)
    assert not got and status == -signal.SIGUSR1 and alive


def test_plan_main_is_lm2_train_dry_run(capsys):
    """`python -m megatron_lm2.training.plan ARGS` = `lm2-train --dry-run ARGS`: the same plan,
    the same one-line error and exit code."""
    from megatron_lm2 import train
    from megatron_lm2.training import plan

    layout = ["--flavor", "debug", "--mock-data", "--nodes", "2", "--gpus-per-node", "4",
              "--tensor-model-parallel-size", "2", "--global-batch-size", "32"]
    outputs = []
    for main, argv in ((train.main, layout + ["--dry-run"]), (plan.main, layout)):
        assert main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and "TP 2 PP 1 DP 4" in outputs[0]
    errors = []
    for main, argv in ((train.main, ["--dry-run", "--memory-chunk-size", "1000"]),
                       (plan.main, ["--memory-chunk-size", "1000"])):
        assert main(argv) == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] == ("lm2-train: error: --memory-chunk-size=1000 does not divide "
                                      "--seq-length=2048: a training sequence must be a whole number "
                                      "of memory chunks\n")
