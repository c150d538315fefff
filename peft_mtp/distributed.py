"""Distributed training of MTP heads: refuse, at start, the settings that cannot work.

MTP heads train under `accelerate launch` / `torchrun` with the plain Trainer or SFTTrainer: DDP, FSDP2 and
DeepSpeed ZeRO-2/3 need no code of their own (see docs/distributed.md). What this module catches are the
combinations that would fail late, obscurely, or silently:

- The heads are built from the base model's weights (sizes, the probe forward pass, copies of decoder
  layers), so those weights must exist in every process when the heads are created. DeepSpeed ZeRO-3's
  `zero.Init` and FSDP's `cpu_ram_efficient_loading` load a model already partitioned or on the meta
  device: `check_base_weights_materialized` refuses them when the heads are attached.
- accelerate enables FSDP only on GPUs and other accelerators. On CPU (`use_cpu=True`) an FSDP config is
  dropped without a word and the run is plain DDP, so `check_distributed_setup` refuses it.
- FSDP1 wraps the model's modules, and PEFT's structural walk then misses a trunk LoRA when saving (the
  adapter silently lacks it): `check_distributed_setup` asks for FSDP2.
- FSDP with a `SHARDED_STATE_DICT` writes checkpoints that are only DCP shards: `PeftModel.from_pretrained`
  cannot read them. `check_distributed_setup` asks for `FULL_STATE_DICT`, where every checkpoint is a
  normal adapter.

Both run by themselves: `check_base_weights_materialized` when heads are attached (`get_peft_model`,
`PeftModel.from_pretrained`), `check_distributed_setup` when SFTTrainer is constructed
(`peft_mtp.training.attach_trainer`). With another trainer, call `check_distributed_setup(trainer.args)`
after constructing it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:  # `import peft_mtp` stays light: transformers' training stack is imported only when used
    from transformers import TrainingArguments

DOCS = "docs/distributed.md"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes", "on")


def check_base_weights_materialized(model: nn.Module) -> None:
    """Refuse to build heads on a base model whose weights this process does not hold.

    Args:
        model: the base causal LM the heads are attached to.

    Raises:
        ValueError: its parameters are DeepSpeed ZeRO-3 partitions (the model was loaded under
            `deepspeed.zero.Init`), or they are on the meta device while FSDP's `cpu_ram_efficient_loading`
            is on (only rank 0 loaded the weights).
    """
    parameters = list(model.parameters())
    # `ds_id` is set on every parameter `deepspeed.zero.Init` partitions; its `.shape` is then empty.
    if any(hasattr(p, "ds_id") for p in parameters):
        raise ValueError(
            "The base model was loaded under DeepSpeed ZeRO-3 `zero.Init`: each process holds only a partition "
            "of its weights, and MTP heads are built from them (sizes, a probe forward pass, copies of decoder "
            "layers). Create the model and its heads (`get_peft_model`) BEFORE the `TrainingArguments`/`SFTConfig` "
            "that names the ZeRO-3 config, and pass the PeftModel to the trainer: ZeRO-3 then partitions it when "
            "training starts. (transformers applies `zero.Init` whenever such arguments exist, whatever accelerate's "
            f"`zero3_init_flag` says.) Or use ZeRO-2. See {DOCS}."
        )
    if any(p.is_meta for p in parameters) and _env_flag("ACCELERATE_USE_FSDP"):
        raise ValueError(
            "The base model's weights are on the meta device in this process: FSDP's `cpu_ram_efficient_loading` "
            "loads them on rank 0 only, and MTP heads are built from them. Set `fsdp_cpu_ram_efficient_loading: "
            f"false` in the accelerate config (or `cpu_ram_efficient_loading` in `fsdp_config`). See {DOCS}."
        )


def check_distributed_setup(args: TrainingArguments, state: Any | None = None) -> None:
    """Refuse distributed settings under which MTP heads cannot train or save as asked.

    Call it after the Trainer exists: its accelerator decides the setup. SFTTrainer calls it through
    `peft_mtp.training.attach_trainer`.

    Args:
        args: the Trainer's training arguments (`TrainingArguments` or `SFTConfig`).
        state: accelerate's `AcceleratorState`; defaults to the one the Trainer's accelerator created.

    Raises:
        ValueError: FSDP was asked for but accelerate runs the job without it (CPU), FSDP1 was asked for,
            or FSDP saves sharded-only checkpoints.
    """
    if state is None:
        from accelerate.state import AcceleratorState, is_initialized

        if not is_initialized():
            return  # no accelerator yet: nothing distributed to check
        state = AcceleratorState()
    distributed_type = getattr(state, "distributed_type", None)
    distributed_type = getattr(distributed_type, "value", distributed_type)  # "MULTI_CPU", not the enum's repr
    fsdp_plugin = getattr(state, "fsdp_plugin", None)
    if (args.fsdp or _env_flag("ACCELERATE_USE_FSDP")) and fsdp_plugin is None:
        source = (f"`fsdp={args.fsdp!r}` in the training arguments" if args.fsdp
                  else "the accelerate config (`distributed_type: FSDP`)")
        raise ValueError(
            f"FSDP was requested by {source}, but accelerate runs this job as "
            f"{distributed_type or 'a single process'} without FSDP. accelerate enables "
            "FSDP only on GPUs and other accelerators: with `use_cpu=True` (or no GPU) it drops the FSDP config and "
            "trains with plain DDP, sharding nothing. On CPU, launch with examples/accelerate/ddp.yaml (or torchrun) "
            f"instead. See {DOCS}."
        )
    if fsdp_plugin is not None:
        version = getattr(fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ValueError(
                f"FSDP version {version} is not supported with MTP heads: FSDP1 wraps the model's "
                "modules, and a trunk LoRA inside those wrappers is left out of saved adapters without an error. Use "
                "FSDP2: `fsdp_version: 2` in the accelerate config (or `version: 2` in `fsdp_config`). See "
                f"{DOCS}."
            )
        state_dict_type = str(getattr(fsdp_plugin, "state_dict_type", ""))
        if "FULL_STATE_DICT" not in state_dict_type:
            raise ValueError(
                f"FSDP `state_dict_type` is {state_dict_type.rsplit('.', 1)[-1]!r}: checkpoints would hold only "
                "sharded files, which `PeftModel.from_pretrained` cannot load. Set `fsdp_state_dict_type: "
                "FULL_STATE_DICT` in the accelerate config (or `state_dict_type` in `fsdp_config`): every "
                f"checkpoint is then a normal adapter (the heads and any trunk LoRA). See {DOCS}."
            )
