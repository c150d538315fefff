"""FSDP2 on CPU: accelerate's own FSDP2 sharding of a model with MTP heads, trained the way SFTTrainer trains it.

accelerate (1.15) enables FSDP only on GPUs and other accelerators: on CPU it drops the FSDP config and runs
plain DDP (which peft_mtp refuses at start). torch 2.13's FSDP2 (`fully_shard`) itself runs on CPU with
gloo, so this script shards the model with `accelerate.utils.fsdp_utils.fsdp2_prepare_model`, the function
`Accelerator.prepare` runs for examples/accelerate/fsdp.yaml on GPUs (one unit per decoder layer, the
heads' decoder-layer copies included, then the unembedding group, then the root), and trains it like
SFTTrainer: TRL's fused LM head (`add_fused_lm_head`, so the unembedding is never called as a module) and
TRL's loss `-log_probs.sum() / num_tokens`. At the end it gathers the full state dict, as the Trainer does
with `FULL_STATE_DICT`, and saves the adapter with `save_pretrained`.

    python tests/fsdp_cpu_script.py --output_dir runs/one                                # reference, no FSDP
    torchrun --nproc_per_node 2 tests/fsdp_cpu_script.py --output_dir runs/fsdp --fsdp   # 2 gloo processes

Every step takes rows [8s, 8s + 8) of fixed random data, split evenly across the processes, so every
process has as many targets and FSDP's gradient average equals the one-process gradient. The main process
writes `<output_dir>/result.json` (the loss of every step) and the adapter to `<output_dir>/final/`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import warnings

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from trl.trainer.utils import add_fused_lm_head

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distributed_exit import exit_distributed_launch  # noqa: E402
from tiny_models import VOCAB_SIZE, make_model  # noqa: E402

from peft_mtp import MTPConfig  # noqa: E402

GLOBAL_BATCH = 8
SEQ_LEN = 16


def build_model(arch: str, head_type: str, lora: bool):
    """A tiny model with 2 MTP heads, patched with TRL's fused LM head as SFTTrainer patches it."""
    model = make_model(arch, seed=0)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None
    torch.manual_seed(0)
    return get_peft_model(model, MTPConfig(num_heads=2, head_type=head_type, lora_config=lora_config))


def shard(model):
    """Apply accelerate's FSDP2 preparation (full shard, transformer-layer wrapping, full state dicts)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False,
    )
    # The attributes `fsdp2_prepare_model` reads from an `Accelerator`; a real one refuses FSDP on CPU.
    accelerator = types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, mixed_precision="no",
        is_main_process=dist.get_rank() == 0, device=torch.device("cpu"),  # read by accelerate >= 1.16
    )
    return fsdp2_prepare_model(accelerator, model)


def main(args: argparse.Namespace) -> None:
    distributed = args.fsdp
    if distributed:
        dist.init_process_group("gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model = build_model(args.arch, args.head_type, args.lora)
    if distributed:
        model = shard(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rows = torch.randint(3, VOCAB_SIZE, (GLOBAL_BATCH * args.steps, SEQ_LEN),
                         generator=torch.Generator().manual_seed(1234))
    losses = []
    for step in range(args.steps):
        batch = rows[step * GLOBAL_BATCH:(step + 1) * GLOBAL_BATCH].chunk(world_size)[rank]
        outputs = model(input_ids=batch, labels=batch, fused_lm_head=True)
        loss = -outputs.log_probs.sum() / outputs.label_mask.sum()  # SFTTrainer's loss (one micro-batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        logged = loss.detach().clone()
        if distributed:
            dist.all_reduce(logged)
        losses.append(logged.item() / world_size)

    if distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # A collective: every rank takes part, rank 0 receives the full tensors (what FULL_STATE_DICT saves).
        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state_dict = None
    if rank == 0:
        model.save_pretrained(os.path.join(args.output_dir, "final"), state_dict=state_dict)
        with open(os.path.join(args.output_dir, "result.json"), "w") as handle:
            json.dump({"losses": losses, "world_size": world_size, "wrapper": type(model).__name__}, handle, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (launch with torchrun)")
    parser.add_argument("--arch", default="qwen2", help="tiny model (qwen2: untied unembedding)")
    parser.add_argument("--head_type", default="identical")
    parser.add_argument("--lora", action="store_true", help="train a trunk LoRA with the heads")
    parser.add_argument("--steps", type=int, default=4)
    # Without a trainer, the fused path warns that metrics are not logged: expected here.
    warnings.filterwarnings("ignore", message="MTP heads are training through a fused LM head")
    main(parser.parse_args())
    exit_distributed_launch()
