"""The main job's stage bookkeeping (examples/main_job.py): what a rerun reuses and what it resumes."""

from __future__ import annotations

import os
import sys

import datasets
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import main_job  # noqa: E402  (examples/ is not a package)


class _Model:
    dtype = torch.float32


@pytest.fixture
def fake_distiller(monkeypatch):
    """`build_self_distilled_dataset` replaced by a recorder: answers are the prompts' ids, each call is logged."""
    import peft_mtp.distill

    calls = []

    def build(model, tokenizer, rows, **kwargs):
        calls.append(list(rows["id"]))
        return datasets.Dataset.from_list([{"prompt": r["messages"], "completion": [{"role": "assistant",
                                            "content": r["id"]}]} for r in rows])

    monkeypatch.setattr(peft_mtp.distill, "build_self_distilled_dataset", build)
    return calls


def _prompts(count: int) -> datasets.Dataset:
    return datasets.Dataset.from_list([{"id": f"p{i}", "kind": "chat",
                                        "messages": [{"role": "user", "content": f"question {i}"}]}
                                       for i in range(count)])


def _distill(tmp_path, budget_min: float):
    args = main_job.JobArguments(work_dir=str(tmp_path), mixed_precision="no", distill_batch_size=2,
                                 distill_max_new_tokens=8, time_budget_min=budget_min)
    clock = main_job.Clock(budget_min)
    data, key = main_job.distill(args, _Model(), None, _prompts(12), "model", clock)
    return sorted(c[0]["content"] for c in data["completion"]), key


def test_a_distillation_cut_short_is_reused_by_the_same_budget_and_continued_by_a_larger_one(
        tmp_path, fake_distiller, monkeypatch):
    # A zero-second distill share: the first chunk (4 prompts) always runs, then the budget is spent.
    monkeypatch.setitem(main_job.STAGE_BUDGET, "distill", 0.0)
    answers, key = _distill(tmp_path, budget_min=30)
    assert answers == ["p0", "p1", "p2", "p3"] and len(fake_distiller) == 1  # one chunk: 2 batches of 2 prompts

    again, again_key = _distill(tmp_path, budget_min=30)  # the same flags: nothing generated, same data
    assert (again, again_key) == (answers, key) and len(fake_distiller) == 1

    monkeypatch.setitem(main_job.STAGE_BUDGET, "distill", 1.0)
    more, more_key = _distill(tmp_path, budget_min=40)  # a larger budget resumes after the cached chunk
    assert more == sorted(f"p{i}" for i in range(12)) and more_key != key
    assert fake_distiller[1:] == [["p4", "p5", "p6", "p7"], ["p8", "p9", "p10", "p11"]]

    final, final_key = _distill(tmp_path, budget_min=30)  # complete now: every budget reuses all of it
    assert (final, final_key) == (more, more_key) and len(fake_distiller) == 3


def test_bf16_check_keeps_the_best_round_of_each_dtype(monkeypatch):
    # A fake clock: each timed pass lasts what this list says, in call order (float32, then bf16, per round). The
    # first float32 pass is disturbed (10 s): one pass alone would call bf16 10x faster; the best rounds tie.
    durations = iter([10.0, 1.0] + [1.0, 1.0] * 4)
    now = [0.0]
    started = [False]

    def perf_counter():
        if started[0]:
            now[0] += next(durations)
        started[0] = not started[0]
        return now[0]

    monkeypatch.setattr(main_job.time, "perf_counter", perf_counter)
    assert main_job.bf16_matmul_is_faster(size=(8, 8, 8), repeats=1, rounds=5) is False


def test_evaluation_reruns_the_same_command_in_a_fresh_process_that_keeps_the_job_clock(tmp_path, monkeypatch):
    import subprocess

    args = main_job.JobArguments(report_dir=str(tmp_path), head_type="ffn", num_heads=3)
    monkeypatch.setattr(sys, "argv", ["main_job.py", "--head_type", "ffn", "--num_heads", "3"])
    monkeypatch.setattr(main_job.time, "time", lambda: 1000.0)
    clock = main_job.Clock(30)
    calls = []

    def fake_run(command, env):
        calls.append((command, env))
        child_clock_start = float(env[main_job.JOB_START_ENV])
        main_job.write_json(tmp_path / "results-ffn-k3.json", {"results": {"code": {"start": child_clock_start}}})
        return subprocess.CompletedProcess(command, returncode=0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(main_job.time, "time", lambda: 1600.0)  # ten minutes into the job
    assert main_job.evaluate_in_fresh_process(args, clock) == {"code": {"start": 1000.0}}
    (command, env), = calls
    assert command == [sys.executable, os.path.abspath(main_job.__file__), "--head_type", "ffn", "--num_heads", "3"]
    monkeypatch.setenv(main_job.JOB_START_ENV, env[main_job.JOB_START_ENV])
    assert main_job.Clock(30).elapsed() == 600.0  # the child's clock counts from the parent's start

    monkeypatch.setattr(subprocess, "run", lambda command, env: subprocess.CompletedProcess(command, returncode=3))
    with pytest.raises(SystemExit) as failed:
        main_job.evaluate_in_fresh_process(args, clock)
    assert failed.value.code == 3


class _CharTokenizer:
    """Token ids are character codes."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}


def test_answer_corpus_is_built_from_the_answers_saved_beside_the_heads_and_read_back(tmp_path):
    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "q"}],
                                        "completion": [{"role": "assistant", "content": text}]}
                                       for text in ("Sure! Here is", "Sure! Here it is", "Sure! Here is x")])
    corpus = main_job.answer_corpus(_CharTokenizer(), data, tmp_path)
    assert (tmp_path / "ngram_corpus.safetensors").exists()
    assert "".join(map(chr, corpus.draft([ord(c) for c in "Sur"], 6))) == "e! Her"
    again = main_job.answer_corpus(None, None, tmp_path)  # read back: neither tokenizer nor data needed
    assert again.followers == corpus.followers


def test_timed_modes_cover_chain_tree_lookup_and_corpus_drafts():
    modes = main_job.JobArguments().modes
    assert modes == ["depth=auto", "depth=1", "tree depth=auto", "chain+lookup depth=auto",
                     "chain+lookup+corpus depth=auto", "tree+lookup depth=auto"]
    assert [main_job.mode_shape_and_depth(m) for m in modes[3:]] == [("chain+lookup", "auto"),
                                                                    ("chain+lookup+corpus", "auto"),
                                                                    ("tree+lookup", "auto")]
    assert main_job.JobArguments(eval_corpus_depths="", eval_depths="2").modes[:1] == ["depth=2"]


def test_feature_layers_flag_is_parsed_into_layer_indices_or_refused_with_its_name():
    assert main_job.JobArguments(feature_layers="2, 15").feature_layer_indices == [2, 15]
    assert main_job.JobArguments().feature_layer_indices == []  # the default: the trunk output alone
    with pytest.raises(ValueError, match=r"--feature_layers must be comma-separated layer indices \(e.g. 2,15\), "
                                         r"got 'two'."):
        _ = main_job.JobArguments(feature_layers="two").feature_layer_indices


class _OracleHeads:
    """A stand-in for a PeftModel with two MTP heads: head 1 always drafts the right token, head 2 never does."""

    device = torch.device("cpu")

    def __init__(self, draft_ids: list[int], vocab_size: int = 10):
        from types import SimpleNamespace

        from peft_mtp.draft_vocab import DraftVocabulary

        vocab = DraftVocabulary(len(draft_ids), vocab_size)
        vocab.token_ids.copy_(torch.tensor(draft_ids))
        self.base_model = SimpleNamespace(active_heads=lambda: SimpleNamespace(num_heads=2, draft_vocab=vocab))
        self.vocab_size = vocab_size

    def __call__(self, input_ids, output_mtp_logits):
        from types import SimpleNamespace

        length = input_ids.shape[1]
        logits = torch.zeros(1, length, 2, self.vocab_size)
        for t in range(length):
            if t + 2 < length:
                logits[0, t, 0, input_ids[0, t + 2]] = 1.0  # head 1 at t predicts token t+2: right
            logits[0, t, 1, 0] = 1.0  # head 2 drafts token 0, which no answer holds
        return SimpleNamespace(mtp_logits=logits, mtp_head_logits=None)


def test_agreement_scores_each_head_on_the_answer_and_simulates_chained_steps():
    result = main_job.agreement_on_token_ids(_OracleHeads(draft_ids=[1, 2, 3, 4]), [[5, 6]], [[1, 2, 3, 7]])
    # Head 1 is scored at the 3 positions whose token 2 ahead is an answer token, head 2 at the 2 with one 3 ahead.
    # Chained drafting from the last prompt token: two steps of 1 + 1 accepted tokens. 3 of the 4 answer tokens are
    # in the draft vocabulary.
    assert result == {"head_agreement": [1.0, 0.0], "tokens_per_step_simulated": 2.0, "draft_vocab_coverage": 0.75}
