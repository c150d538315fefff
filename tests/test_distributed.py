"""Distributed training of MTP heads: DDP and FSDP2 against one process, checkpoints that survive a kill.

The multi-process tests launch 2 CPU processes (gloo) in a subprocess, on a free port, with the scripts
`distributed_train_script.py` (TRL's SFTTrainer) and `fsdp_cpu_script.py` (accelerate's FSDP2 sharding,
which accelerate itself runs on GPUs only). Every launch trains a tiny model for a few steps on fixed rows
with a sequential sampler, so a 2 x 4 run sees the same global batches as a 1 x 8 run and must end with the
same heads. Measured differences are ~1e-6 (DDP, FSDP2, DeepSpeed); the tolerances leave a margin of
about 10x, far below what a real bug gives (the MTP loss counted twice under DDP moved heads by 4e-3).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil  # an accelerate dependency
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import make_model
from transformers.trainer_utils import get_last_checkpoint

from peft_mtp import MTPConfig
from peft_mtp.checkpoints import is_complete_checkpoint, last_complete_checkpoint
from peft_mtp.distributed import check_base_weights_materialized, check_distributed_setup

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TRAIN_SCRIPT = TESTS / "distributed_train_script.py"
FSDP_SCRIPT = TESTS / "fsdp_cpu_script.py"
ACCELERATE_CONFIGS = ROOT / "examples" / "accelerate"

WEIGHT_ATOL = 5e-5
LOSS_ATOL = 2e-5
LAUNCH_TIMEOUT = 300

# SFTConfig for every run: CPU, float32 (SFTConfig defaults to bf16 and gradient checkpointing, slow on CPU),
# 6 optimizer steps of 8 rows in order, a checkpoint every 2 steps.
SFT_ARGS = [
    "--use_cpu", "--bf16", "false", "--gradient_checkpointing", "false", "--max_steps", "6",
    "--learning_rate", "1e-2", "--train_sampling_strategy", "sequential", "--report_to", "none",
    "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2", "--seed", "0", "--disable_tqdm", "true",
]
ONE_PROCESS = ["--per_device_train_batch_size", "8"]
TWO_PROCESSES = ["--per_device_train_batch_size", "4"]
JOINT = ["--lora", "true", "--head_type", "sequential"]  # trunk LoRA + decoder-layer heads


# ----------------------------------------------------------------------------------------------
# Launching


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # One thread per process: the same arithmetic in every run, and 2 processes fit 2 cores.
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def python(script: Path, *args: str) -> list[str]:
    return [sys.executable, str(script), *args]


def torchrun(script: Path, *args: str) -> list[str]:
    # --standalone: the launcher binds a free port itself (a port picked here could be taken before it binds).
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]


def accelerate_launch(config: str, script: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config),
            "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
            str(script), *args]


def run(command: list[str], expect_success: bool = True) -> subprocess.CompletedProcess:
    """Run a launch to completion; on an unexpected exit code, fail with the end of its output."""
    result = subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    if (result.returncode == 0) != expect_success:
        output = (result.stdout + result.stderr)[-6000:]
        pytest.fail(f"{' '.join(command)} exited with {result.returncode}:\n{output}")
    return result


def train(command: list[str], output_dir: Path) -> dict:
    run(command + ["--output_dir", str(output_dir)])
    return json.loads((output_dir / "result.json").read_text())


# ----------------------------------------------------------------------------------------------
# Comparing runs


def heads(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "final" / "adapter_model.safetensors")


def losses(result: dict) -> dict[int, tuple[float, float]]:
    """Step -> (logged loss, logged weighted MTP loss)."""
    return {e["step"]: (e["loss"], e["mtp/loss"]) for e in result["log_history"] if "loss" in e}


def assert_same_heads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=WEIGHT_ATOL, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def assert_same_losses(a: dict, b: dict) -> None:
    steps_a, steps_b = losses(a), losses(b)
    assert steps_a.keys() == steps_b.keys()
    for step in steps_a:
        assert steps_a[step] == pytest.approx(steps_b[step], abs=LOSS_ATOL), f"step {step}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, Path]:
    """One process, frozen trunk, `ffn` heads: the run the others must reproduce."""
    output_dir = tmp_path_factory.mktemp("reference")
    return train(python(TRAIN_SCRIPT, *SFT_ARGS, *ONE_PROCESS), output_dir), output_dir


@pytest.fixture(scope="module")
def joint_reference(tmp_path_factory) -> tuple[dict, Path]:
    """One process, trunk LoRA + `sequential` heads."""
    output_dir = tmp_path_factory.mktemp("joint_reference")
    return train(python(TRAIN_SCRIPT, *SFT_ARGS, *ONE_PROCESS, *JOINT), output_dir), output_dir


# ----------------------------------------------------------------------------------------------
# DDP


def test_ddp_torchrun_matches_one_process(reference, tmp_path):
    """torchrun, 2 x 2 rows x 2 accumulation steps = the reference's 8 rows per step: same losses, same heads."""
    expected, expected_dir = reference
    command = torchrun(TRAIN_SCRIPT, *SFT_ARGS, "--per_device_train_batch_size", "2",
                       "--gradient_accumulation_steps", "2", "--save_strategy", "no")
    result = train(command, tmp_path)
    assert result["world_size"] == 2
    assert result["wrapper"] == "DistributedDataParallel"
    assert_same_losses(result, expected)
    assert_same_heads(heads(tmp_path), heads(expected_dir))


# ----------------------------------------------------------------------------------------------
# FSDP


def test_fsdp2_on_cpu_matches_one_process(tmp_path):
    """FSDP2 full shard (accelerate's wrapping), trunk LoRA, decoder-layer heads, untied unembedding, TRL's fused head.

    The saved folder is a normal adapter that `PeftModel.from_pretrained` loads, with no sharded files.
    """
    one, two = tmp_path / "one", tmp_path / "two"
    expected = train(python(FSDP_SCRIPT, "--lora"), one)
    result = train(torchrun(FSDP_SCRIPT, "--fsdp", "--lora"), two)
    assert result["world_size"] == 2
    assert result["wrapper"].startswith("FSDP")
    assert result["losses"] == pytest.approx(expected["losses"], abs=LOSS_ATOL)
    assert_same_heads(heads(two), heads(one))
    assert sorted(p.name for p in (two / "final").iterdir()) == ["README.md", "adapter_config.json",
                                                                  "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(make_model("qwen2", seed=0), two / "final")
    assert torch.equal(loaded.base_model.mtp.mtp_heads["default"].heads[0].layers[0].mlp.up_proj.weight,
                       heads(two)["base_model.mtp.mtp_heads.heads.0.layers.0.mlp.up_proj.weight"])


def test_fsdp_config_on_cpu_is_refused_at_start(tmp_path):
    """accelerate drops an FSDP config on CPU and would train plain DDP: the trainer refuses at construction."""
    result = run(accelerate_launch("fsdp.yaml", TRAIN_SCRIPT, *SFT_ARGS, *TWO_PROCESSES,
                                   "--output_dir", str(tmp_path)), expect_success=False)
    assert "accelerate enables FSDP only on GPUs" in result.stderr
    assert not list(tmp_path.glob("checkpoint-*"))  # refused before the first step


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")
def test_fsdp_on_gpus_matches_one_gpu(tmp_path):
    """examples/accelerate/fsdp.yaml on GPUs (2 if present, else 1): same heads, checkpoints are adapters.

    Manual check on a GPU machine: `python -m pytest tests/test_distributed.py -m gpu`.
    """
    processes = min(2, torch.cuda.device_count())
    gpu_args = [a for a in SFT_ARGS if a != "--use_cpu"]
    per_device = ["--per_device_train_batch_size", str(8 // processes)]
    one, sharded = tmp_path / "one", tmp_path / "fsdp"
    expected = train(python(TRAIN_SCRIPT, *gpu_args, *ONE_PROCESS), one)
    command = accelerate_launch("fsdp.yaml", TRAIN_SCRIPT, *gpu_args, *per_device)
    command[command.index("--num_processes") + 1] = str(processes)
    result = train(command, sharded)
    assert result["distributed_type"].endswith("FSDP")
    assert_same_losses(result, expected)
    assert_same_heads(heads(sharded), heads(one))
    checkpoint = sharded / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    PeftModel.from_pretrained(make_model("llama", seed=0), checkpoint)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it, as a lost machine would stop them.

    The launcher starts its ranks in sessions of their own, so killing its process group would leave them running.
    """
    try:
        ranks = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:  # it had already exited
        ranks = []
    for victim in [*ranks, process]:
        try:
            victim.kill()  # SIGKILL
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    process.wait()
    psutil.wait_procs(ranks, timeout=30)


def test_resume_after_kill_matches_uninterrupted(joint_reference, tmp_path):
    """examples/accelerate/ddp.yaml on CPU (2 gloo processes), trunk LoRA and decoder-layer heads: killed between
    steps after checkpoint-2 and resumed, the run logs the losses and ends with the heads of one uninterrupted
    process (so DDP matches one process at every step, and resuming loses nothing).
    """
    expected, expected_dir = joint_reference
    args = [*SFT_ARGS, *TWO_PROCESSES, *JOINT, "--output_dir", str(tmp_path)]
    # Each process sleeps after every checkpoint: the kill lands between steps, not in a save.
    process = subprocess.Popen(accelerate_launch("ddp.yaml", TRAIN_SCRIPT, *args, "--pause_after_save", "300"),
                               env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        checkpoint = tmp_path / "checkpoint-2"
        # Both processes pause after their last write of checkpoint-2 (rank 1 writes its own RNG state): the kill
        # must not land in a write.
        paused = [tmp_path / f"paused-2-rank{rank}" for rank in (0, 1)]
        while not (is_complete_checkpoint(str(checkpoint)) and all(marker.is_file() for marker in paused)):
            assert process.poll() is None, f"the run exited with {process.returncode} before checkpoint-2"
            assert time.monotonic() < deadline, "no checkpoint-2 in time"
            time.sleep(0.2)
    finally:
        _kill_tree(process)
    assert not (tmp_path / "checkpoint-4").exists() and not (tmp_path / "result.json").exists()

    result = train(accelerate_launch("ddp.yaml", TRAIN_SCRIPT, *args, "--resume", "true"), tmp_path)
    assert result["world_size"] == 2
    assert result["distributed_type"].endswith("MULTI_CPU")
    assert result["resumed_from"] == str(tmp_path / "checkpoint-2")
    assert_same_losses(result, expected)  # steps 1-2 logged before the kill (kept in checkpoint-2), 3-6 after
    assert_same_heads(heads(tmp_path), heads(expected_dir))


def test_resume_skips_half_written_checkpoint(reference, tmp_path):
    """A run killed while writing checkpoint-4 leaves checkpoint-2 loadable, and resuming from it loses nothing."""
    expected, expected_dir = reference
    args = [*SFT_ARGS, *ONE_PROCESS, "--output_dir", str(tmp_path)]
    result = run(python(TRAIN_SCRIPT, *args, "--crash_during_save_at", "4"), expect_success=False)
    assert result.returncode == -signal.SIGKILL
    assert (tmp_path / "checkpoint-4" / "adapter_model.safetensors").is_file()  # written half-way
    assert not (tmp_path / "checkpoint-4" / "optimizer.pt").exists()

    # transformers' own choice (`resume_from_checkpoint=True`) is the broken folder; ours is the complete one.
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    PeftModel.from_pretrained(make_model("llama", seed=0), tmp_path / "checkpoint-2")

    result = train(python(TRAIN_SCRIPT, *args, "--resume", "true"), tmp_path)
    assert result["resumed_from"] == str(tmp_path / "checkpoint-2")
    assert_same_losses(result, expected)
    assert_same_heads(heads(tmp_path), heads(expected_dir))


def _write_checkpoint(folder: Path, step: int, state: str | None = None) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"")
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


@pytest.mark.parametrize(
    ("newest_state", "complete"),
    [
        (None, False),  # the save stopped before trainer_state.json
        ('{"global_step": 6, "log_hi', False),  # it stopped while writing it
        ('{"global_step": 5}', False),  # a file from another step
        ('{"global_step": 6}', True),
    ],
    ids=["missing", "truncated", "wrong-step", "complete"],
)
def test_last_complete_checkpoint(tmp_path, newest_state, complete):
    older = _write_checkpoint(tmp_path, 3, '{"global_step": 3}')
    newest = _write_checkpoint(tmp_path, 6, newest_state)
    (tmp_path / "checkpoint-9-notes.txt").write_text("")  # not a checkpoint folder
    assert is_complete_checkpoint(str(newest)) is complete
    assert last_complete_checkpoint(str(tmp_path)) == str(newest if complete else older)


def test_last_complete_checkpoint_none(tmp_path):
    assert last_complete_checkpoint(str(tmp_path / "missing")) is None
    assert last_complete_checkpoint(str(tmp_path)) is None
    _write_checkpoint(tmp_path, 2)
    assert last_complete_checkpoint(str(tmp_path)) is None


# ----------------------------------------------------------------------------------------------
# Settings refused at start (no launch)


def _state(distributed_type: str = "MULTI_GPU", fsdp_plugin=None) -> SimpleNamespace:
    return SimpleNamespace(distributed_type=distributed_type, fsdp_plugin=fsdp_plugin)


def test_check_distributed_setup(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    no_fsdp, fsdp = SimpleNamespace(fsdp=None), SimpleNamespace(fsdp="full_shard")
    check_distributed_setup(no_fsdp, _state("MULTI_CPU"))  # DDP
    full = "StateDictType.FULL_STATE_DICT"
    check_distributed_setup(fsdp, _state("FSDP", SimpleNamespace(fsdp_version=2, state_dict_type=full)))
    with pytest.raises(ValueError, match="FSDP version 1 is not supported.*fsdp_version: 2"):
        check_distributed_setup(fsdp, _state("FSDP", SimpleNamespace(fsdp_version=1, state_dict_type=full)))
    with pytest.raises(ValueError, match="FSDP only on GPUs"):
        check_distributed_setup(fsdp, _state("MULTI_CPU"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    with pytest.raises(ValueError, match="the accelerate config"):
        check_distributed_setup(no_fsdp, _state("MULTI_CPU"))
    with pytest.raises(ValueError, match="SHARDED_STATE_DICT.*FULL_STATE_DICT"):
        check_distributed_setup(no_fsdp, _state("FSDP", SimpleNamespace(fsdp_version=2,
                                                                         state_dict_type="SHARDED_STATE_DICT")))


def test_heads_refused_on_zero3_partitioned_weights():
    model = make_model("llama")
    for parameter in model.parameters():
        parameter.ds_id = 0  # what `deepspeed.zero.Init` marks its partitioned parameters with
    with pytest.raises(ValueError, match="ZeRO-3 `zero.Init`.*BEFORE"):
        get_peft_model(model, MTPConfig(num_heads=2))


def test_heads_refused_on_meta_weights_under_fsdp(monkeypatch):
    model = make_model("llama").to("meta")
    check_base_weights_materialized(model)  # meta weights alone (e.g. big-model offloading) are not refused
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="cpu_ram_efficient_loading"):
        check_base_weights_materialized(model)


# ----------------------------------------------------------------------------------------------
# DeepSpeed (not a dependency: runs where it is installed)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_one_process(joint_reference, tmp_path, monkeypatch, stage):
    """ZeRO-2 and ZeRO-3 (heads built before the config), trunk LoRA and decoder-layer heads: same heads."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    expected, expected_dir = joint_reference
    result = train(accelerate_launch(f"deepspeed_zero{stage}.yaml", TRAIN_SCRIPT, *SFT_ARGS, *TWO_PROCESSES,
                                     *JOINT), tmp_path)
    assert result["distributed_type"].endswith("DEEPSPEED")
    assert_same_losses(result, expected)
    assert_same_heads(heads(tmp_path), heads(expected_dir))
    PeftModel.from_pretrained(make_model("llama", seed=0), tmp_path / "checkpoint-2")


def test_mtp_loss_follows_trainer_normalisation():
    """With `num_items_in_batch` (Trainer, under DDP or gradient accumulation), the MTP loss is scaled like the
    model's own loss: this micro-batch's share of the step's targets. Without it, DDP counted it once per process."""
    torch.manual_seed(0)
    model = get_peft_model(make_model("llama"), MTPConfig(num_heads=2))
    ids = torch.randint(3, 128, (2, 12))
    count = ids[:, 1:].numel()
    alone = model(input_ids=ids, labels=ids)
    half_of_step = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(2 * count))
    torch.testing.assert_close(half_of_step.loss, alone.loss / 2)
    torch.testing.assert_close(half_of_step.mtp_loss, alone.mtp_loss)  # the reported head loss stays a mean
