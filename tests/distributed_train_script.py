"""Train MTP heads on a tiny random model with TRL's plain SFTTrainer: the script the distributed tests launch.

The same file runs single-process, under `torchrun` and under `accelerate launch`, so the tests compare
launchers, not scripts. Training rows are fixed random tokens of one length (no padding) and the sampler
is sequential, so every optimizer step sees the same rows whatever the number of processes: with a
global batch of 8, one process takes rows 0-7, two processes take rows 0-3 and 4-7.

    python tests/distributed_train_script.py --output_dir runs/one --per_device_train_batch_size 8 \
        --use_cpu --bf16 false --max_steps 4 --train_sampling_strategy sequential --report_to none
    torchrun --nproc_per_node 2 tests/distributed_train_script.py --output_dir runs/two \
        --per_device_train_batch_size 4 --use_cpu --bf16 false --max_steps 4 --train_sampling_strategy sequential
    accelerate launch --config_file examples/accelerate/ddp.yaml tests/distributed_train_script.py ...

On exit, the main process writes `<output_dir>/result.json` (the log history, world size, checkpoint resumed
from, accelerate's distributed type) and the final adapter to `<output_dir>/final/`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import datasets
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import HfArgumentParser, PreTrainedTokenizerFast, TrainerCallback
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distributed_exit import exit_distributed_launch  # noqa: E402
from tiny_models import VOCAB_SIZE, make_model  # noqa: E402

from peft_mtp import MTPConfig  # noqa: E402
from peft_mtp.checkpoints import last_complete_checkpoint  # noqa: E402


@dataclass
class ScriptArguments:
    """What the tests vary besides `SFTConfig`.

    Args:
        head_type: MTP head architecture.
        num_heads: number of MTP heads.
        lora: also train a LoRA on the trunk (joint mode) instead of freezing it.
        num_rows: training rows (fixed random tokens).
        seq_len: tokens per row.
        resume: resume from the newest complete checkpoint in `output_dir`, if there is one.
        pause_after_save: seconds to sleep after every checkpoint, so that a test can kill the run between steps.
        crash_during_save_at: kill this process (SIGKILL) half-way through saving the checkpoint of this step:
            after the adapter is written, before the optimizer state and `trainer_state.json`.
    """

    head_type: str = field(default="ffn")
    num_heads: int = field(default=2)
    lora: bool = field(default=False)
    num_rows: int = field(default=64)
    seq_len: int = field(default=16)
    resume: bool = field(default=False)
    pause_after_save: float = field(default=0.0)
    crash_during_save_at: int = field(default=-1)


class PauseAfterSaveCallback(TrainerCallback):
    """Sleep after each checkpoint is complete (`on_save` runs after `trainer_state.json` is written).

    Each process first leaves a marker, `paused-<step>-rank<N>` in the output folder: a file of the checkpoint
    exists from the moment its write begins, so only the markers tell that every process is done writing.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_save(self, args, state, control, **kwargs):
        marker = os.path.join(args.output_dir, f"paused-{state.global_step}-rank{args.process_index}")
        with open(marker, "w"):
            pass
        time.sleep(self.seconds)
        return control


def crash_during_save(trainer: SFTTrainer, step: int) -> None:
    """Make the process die half-way through writing `checkpoint-<step>`, as a killed job would.

    `Trainer._save_checkpoint` writes the adapter, then the optimizer and scheduler, then the RNG state, then
    `trainer_state.json`. Dying on entry to the optimizer save leaves a folder with the adapter only.
    """
    original = trainer._save_optimizer_and_scheduler

    def save_or_die(output_dir):
        if trainer.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(output_dir)

    trainer._save_optimizer_and_scheduler = save_or_die


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary ("t0".."t127"); SFTTrainer needs one for its collator."""
    vocab = {f"t{i}": i for i in range(VOCAB_SIZE)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", bos_token="t1", eos_token="t2",
                                   unk_token="t0")


def build_dataset(num_rows: int, seq_len: int, seed: int = 1234) -> datasets.Dataset:
    """Fixed random token rows, identical in every process (already tokenized: SFTTrainer only collates them)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(3, VOCAB_SIZE, (num_rows, seq_len), generator=generator).tolist()
    return datasets.Dataset.from_dict({"input_ids": rows})


def build_model(script_args: ScriptArguments):
    """The tiny Llama with MTP heads (and a trunk LoRA in joint mode), identical in every process."""
    model = make_model("llama", seed=0)
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if script_args.lora else None
    torch.manual_seed(0)  # any randomly initialised head or LoRA weight is the same in every process
    config = MTPConfig(num_heads=script_args.num_heads, head_type=script_args.head_type, lora_config=lora_config)
    return get_peft_model(model, config)


def main(script_args: ScriptArguments, model, training_args: SFTConfig) -> None:
    """Train, save the final adapter, and write `result.json` (see the module docstring)."""
    callbacks = [PauseAfterSaveCallback(script_args.pause_after_save)] if script_args.pause_after_save else []
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=build_dataset(script_args.num_rows, script_args.seq_len),
        processing_class=build_tokenizer(),
        callbacks=callbacks,
    )
    if script_args.crash_during_save_at >= 0:
        crash_during_save(trainer, script_args.crash_during_save_at)
    # Not `resume_from_checkpoint=True`: it would pick the newest checkpoint folder even if its save was cut short.
    resume_from = last_complete_checkpoint(training_args.output_dir) if script_args.resume else None
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(os.path.join(training_args.output_dir, "final"))
    if trainer.is_world_process_zero():
        result = {
            "log_history": trainer.state.log_history,
            "world_size": training_args.world_size,
            "resumed_from": resume_from,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "wrapper": type(trainer.model_wrapped).__name__,
        }
        with open(os.path.join(training_args.output_dir, "result.json"), "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    script_args, rest = HfArgumentParser(ScriptArguments).parse_args_into_dataclasses(return_remaining_strings=True)
    # The model and its heads come before SFTConfig: with a DeepSpeed ZeRO-3 config, creating the config makes
    # transformers load every later model already partitioned (`zero.Init`), and heads cannot be built on that.
    model = build_model(script_args)
    (training_args,) = HfArgumentParser(SFTConfig).parse_args_into_dataclasses(args=rest)
    main(script_args, model, training_args)
    exit_distributed_launch()
