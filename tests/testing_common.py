"""What the table-driven MTP tests share: the case table and small helpers to build and run tiny MTP models.

`TEST_CASES` crosses every tiny architecture (`tiny_models.ARCHITECTURES`) with every head type, in PEFT's
(name, model, config class, config kwargs) shape; each test file turns it into parametrized one-line calls into its
own checkers. Sequences are short (`SEQ_LEN` tokens) so the whole table runs in seconds on a CPU.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import ARCHITECTURES, VOCAB_SIZE, make_model

from peft_mtp import HEAD_TYPES, MTPConfig

SEQ_LEN = 8
NUM_HEADS = 3
# Head types that start as the model's own next-token predictor with head_init="base" (decoder-layer heads start
# as copies of the trunk's last layers instead).
IDENTITY_AT_INIT_HEAD_TYPES = ("linear", "ffn", "mha_ffn", "cnn")
# Trunk LoRA targets per architecture (PEFT has no default for Phi-3's fused projection).
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "gpt2": ["c_attn"], "gemma2": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "opt": ["q_proj", "v_proj"],
}

# (name, architecture, config class, config kwargs): every head type on every architecture.
TEST_CASES: list[tuple[str, str, type, dict[str, Any]]] = [
    (f"{arch}-{head_type}", arch, MTPConfig, {"head_type": head_type, "num_heads": NUM_HEADS})
    for arch in ARCHITECTURES
    for head_type in HEAD_TYPES
]


# Every architecture once with heads that also read a lower trunk layer (`feature_layers`; tiny models have 2 layers),
# on a position-wise and a sequential head type.
FEATURE_TEST_CASES: list[tuple[str, str, type, dict[str, Any]]] = [
    (f"{arch}-{head_type}-features", arch, MTPConfig, {"head_type": head_type, "num_heads": 2, "feature_layers": [0]})
    for arch in ARCHITECTURES
    for head_type in ("ffn", "sequential")
]


# Every architecture once with heads that copy (`copy_ngram`), on a position-wise and a sequential head type.
COPY_TEST_CASES: list[tuple[str, str, type, dict[str, Any]]] = [
    (f"{arch}-{head_type}-copy", arch, MTPConfig, {"head_type": head_type, "num_heads": 2, "copy_ngram": 1})
    for arch in ARCHITECTURES
    for head_type in ("ffn", "sequential")
]


def lora_config(arch: str) -> LoraConfig:
    """A small trunk LoRA for `arch` whose B matrices are random, so that it changes the model's logits."""
    # GPT-2's `Conv1D` stores its weight transposed: PEFT needs to be told (`fan_in_fan_out`).
    return LoraConfig(r=2, lora_alpha=4, target_modules=LORA_TARGETS[arch], init_lora_weights=False,
                      fan_in_fan_out=arch == "gpt2")


# Every architecture once, with trunk LoRA beside `ffn` heads.
LORA_TEST_CASES: list[tuple[str, str, type, dict[str, Any]]] = [
    (f"{arch}-ffn-lora", arch, MTPConfig, {"head_type": "ffn", "num_heads": 2, "lora_config": lora_config(arch)})
    for arch in ARCHITECTURES
]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run a module's tiny-model tests on one torch thread, then restore the thread count.

    On (8, 32)-sized tensors a second thread only adds synchronisation, and on a 2-core machine shared with other
    processes it made these tests 2-3x slower. Test modules import this fixture to use it; it is scoped to them so
    that tests of real models elsewhere in the session keep every thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def case_params(cases: list[tuple[str, str, type, dict[str, Any]]]) -> dict[str, Any]:
    """`pytest.mark.parametrize` arguments for a case table: `(arch, config_cls, config_kwargs)`, ids by name."""
    return {
        "argnames": ("arch", "config_cls", "config_kwargs"),
        "argvalues": [(arch, config_cls, kwargs) for _, arch, config_cls, kwargs in cases],
        "ids": [name for name, *_ in cases],
    }


def make_mtp_model(arch: str, config_cls: type = MTPConfig, seed: int = 0, **config_kwargs: Any) -> PeftModel:
    """A tiny `arch` model with MTP heads, in eval mode.

    Args:
        arch: one of `tiny_models.ARCHITECTURES`.
        config_cls: the config class (`MTPConfig`).
        seed: seed of the base model's weights, and then of the heads' weights.
        **config_kwargs: `MTPConfig` arguments.

    Returns:
        The `PeftModel`.
    """
    base = make_model(arch, seed=seed)
    torch.manual_seed(seed + 1)  # head weights (head_init="random", decoder-layer re-initialisation)
    model = get_peft_model(base, config_cls(**config_kwargs))
    return model.eval()


def random_ids(batch: int = 2, seq_len: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    """`(batch, seq_len)` random token ids, avoiding the special ids 0-2 of the tiny models."""
    return torch.randint(3, VOCAB_SIZE, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def run(model: PeftModel, input_ids: torch.Tensor, **kwargs: Any):
    """Forward without grad, with head logits: `model(input_ids=..., output_mtp_logits=True, **kwargs)`."""
    return model(input_ids=input_ids, output_mtp_logits=True, **kwargs)
