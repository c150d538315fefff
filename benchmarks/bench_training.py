# /// script
# requires-python = ">=3.10"
# dependencies = ["peft_mtp", "trl>=1.16", "psutil"]
# ///
"""Step time and peak memory of plain SFT vs SFT + K MTP heads, on SmolLM2-135M shapes, in one run.

What is compared (all with TRL's plain `SFTTrainer`, the same random-init model and the same batch):

* `sft-lora`, the baseline: plain next-token SFT with LoRA (r=16 on every linear layer of the trunk). This is
  the cheapest plain SFT that trains something on this trunk, and the baseline of both MTP modes.
* `lora+K×<head>`: the same LoRA and K heads trained jointly (Medusa-2 style). Same trainable trunk: the
  strict same-mode comparison, and the one the bar applies to.
* `frozen+K×<head>`: K heads on a frozen trunk (Medusa-1 style, the default). Frozen-trunk SFT without heads
  trains nothing, so it has no like-for-like baseline: it is compared with `sft-lora` too, and it is cheaper
  because the trunk runs without autograd (no trunk backward at all).
* `.../v8192` (`--extra`, `--draft-vocab`): the same heads predicting over a draft vocabulary of 8,192 tokens
  (`MTPConfig.draft_vocab_size`). A full-vocabulary head costs two vocabulary projections per target: about
  0.46 TFLOP per head at 8 x 512, against about 2.7 TFLOP for a whole `sft-lora` step (trunk forward and
  backward about 2, TRL's own head 0.7), so K=4 full-vocabulary heads cannot fit in 1.25x on this shape
  whatever the implementation; with 8,192 of 49,152 tokens a head costs a sixth of that.
* `...@0.25`: heads scoring a random quarter of their targets per step (`MTPConfig.head_loss_sample_rate`).

Bar (issue 3): K=4 heads cost <= 1.25x the step time and <= 1.15x the peak memory of `sft-lora`.

Model: `LlamaConfig(vocab 49,152, hidden 576, intermediate 1,536, 30 layers, 9 heads, 3 KV heads, tied
embeddings)` with random weights (no download), float32 on CPU, bf16 on CUDA. Batch: `--batch` x `--seq`
random tokens (8 x 512 by default), no padding, the same for every configuration. Tokens are drawn so that 96%
of them fall in the 8,192 lowest ids, as 96% of the tokens of SmolLM2's own answers fall in a draft vocabulary of
8,192 tokens fitted on other answers (`benchmarks/draft_vocab_coverage.py`): a fitted draft vocabulary then scores as many targets as it would on real text
(full-vocabulary heads cost the same whatever the tokens). SFTConfig: `bf16=False` on CPU (CPU bf16 is ~10x slower
here), no gradient checkpointing unless `--gradient-checkpointing`, AdamW, `max_steps = warmup + steps`.

How it measures:

* Every configuration runs in a fresh subprocess (its own allocator, nothing left over from another run).
* Step time: wall time between `on_step_begin` and `on_step_end` (forward, backward, optimizer step), the
  fastest of the `--steps` steps (after `--warmup` warm-up steps) over every run of the configuration; and the
  process's CPU time over the same span (all threads). On a shared machine other processes can only add time to
  the run they overlap, so the fastest step is the least disturbed estimate; both ratios are printed and the
  bar is checked on each.
* Peak memory: on CPU, the process's resident-set high-water mark (`getrusage(...).ru_maxrss`, as the kernel
  counts it, weights and Python included); on CUDA, `torch.cuda.max_memory_allocated()`. tracemalloc would see
  Python objects only, not torch's tensors.
* Noise: within each round the order of configurations is rotated, and the baseline runs before, between and
  after them (`--baseline-every`); ratios use the fastest baseline step of all its runs.

Commands:

    # Every configuration (K = 1, 2, 4; ffn and sequential; frozen and LoRA; about an hour on 2 idle cores):
    python benchmarks/bench_training.py --warmup 1 --steps 1

    # A quick smoke run (small shapes, seconds):
    python benchmarks/bench_training.py --layers 2 --seq 64 --batch 2 --vocab 4096 --heads 1 4 --warmup 1 --steps 1

    # The K = 4 bar only (what docs/training.md reports): full-vocabulary ffn heads for reference, then
    # ffn and sequential heads with a draft vocabulary of 8,192 tokens, frozen and LoRA trunks (~12 min idle):
    python benchmarks/bench_training.py --warmup 1 --steps 1 --trunks lora --heads 4 --head-types ffn \
        --baseline-every 3 \
        --extra lora+4xffn/v8192 lora+4xsequential/v8192 frozen+4xffn/v8192 frozen+4xsequential/v8192

    # K = 4 with half of each head's targets scored per step (MTPConfig.head_loss_sample_rate=0.5), nothing else:
    python benchmarks/bench_training.py --warmup 1 --steps 1 --trunks lora --heads 4 --sample-rates 0.5 --extra

    # One configuration only (what each subprocess runs):
    python benchmarks/bench_training.py --only lora+4xffn@0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FREQUENT_IDS, FREQUENT_SHARE = 8192, 0.96


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One configuration: trunk mode ("lora" or "frozen"), K heads of a type (K = 0: plain SFT), the share of
    head targets scored per step (`MTPConfig.head_loss_sample_rate`; the name gets `@rate` below 1) and the draft
    vocabulary size (`MTPConfig.draft_vocab_size`; the name gets `/v<size>`, 0 = the whole vocabulary)."""

    trunk: str
    num_heads: int = 0
    head_type: str = "ffn"
    sample_rate: float = 1.0
    draft_vocab: int = 0

    @property
    def name(self) -> str:
        if self.num_heads == 0:
            return f"sft-{self.trunk}"
        vocab = f"/v{self.draft_vocab}" if self.draft_vocab else ""
        rate = "" if self.sample_rate == 1.0 else f"@{self.sample_rate:g}"
        return f"{self.trunk}+{self.num_heads}x{self.head_type}{vocab}{rate}"

    @classmethod
    def parse(cls, name: str) -> RunSpec:
        if name.startswith("sft-"):
            return cls(trunk=name[4:])
        name, _, rate = name.partition("@")
        name, _, vocab = name.partition("/v")
        trunk, heads = name.split("+")
        count, head_type = heads.split("x", 1)
        return cls(trunk=trunk, num_heads=int(count), head_type=head_type, sample_rate=float(rate or 1.0),
                   draft_vocab=int(vocab or 0))


def build_trainer(spec: RunSpec, args: argparse.Namespace, output_dir: str, callbacks: list):
    """The SFTTrainer of one configuration (model, data, config), built as a user would."""
    import datasets
    import torch
    from peft import LoraConfig
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from peft_mtp import MTPConfig

    cuda = torch.cuda.is_available() and not args.cpu
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=max(2048, args.seq),
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    # A tokenizer only for TRL's bookkeeping (pad / eos ids): the dataset is already tokenized.
    vocab = {f"t{i}": i for i in range(args.vocab)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0")),
                                        pad_token="t2", eos_token="t2")
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch * (args.warmup + args.steps), args.seq - 1)
    # 96% of the tokens among the 8,192 lowest ids, the rest anywhere (see the module docstring).
    frequent = torch.randint(3, min(FREQUENT_IDS, args.vocab), shape, generator=generator)
    rare = torch.randint(3, args.vocab, shape, generator=generator)
    rows = torch.where(torch.rand(shape, generator=generator) < FREQUENT_SHARE, frequent, rare)
    dataset = datasets.Dataset.from_dict({"input_ids": rows.tolist()})  # TRL appends EOS: seq tokens per row

    lora = LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    if spec.num_heads == 0:
        peft_config = lora if spec.trunk == "lora" else None
    else:
        peft_config = MTPConfig(num_heads=spec.num_heads, head_type=spec.head_type,
                                lora_config=lora if spec.trunk == "lora" else None,
                                head_loss_sample_rate=spec.sample_rate, draft_vocab_size=spec.draft_vocab or None)
    sft_args = SFTConfig(
        output_dir=output_dir, use_cpu=not cuda, bf16=cuda, gradient_checkpointing=args.gradient_checkpointing,
        per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps, max_length=args.seq,
        learning_rate=1e-4, logging_steps=10_000, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    return SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config, callbacks=callbacks)


def run_one(spec: RunSpec, args: argparse.Namespace) -> dict:
    """Train one configuration in this process; return its step times and peak memory."""
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(args.threads or torch.get_num_threads())

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.cpu_times: list[float] = []
            self._start = self._cpu_start = 0.0

        def on_step_begin(self, *unused, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, *unused, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)
            self.cpu_times.append(time.process_time() - self._cpu_start)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(spec, args, output_dir, [timer])
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss is KiB on Linux)
        if torch.cuda.is_available() and not args.cpu:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    measured = timer.times[args.warmup:]
    if torch.cuda.is_available() and not args.cpu:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"name": spec.name, "step_s": measured, "cpu_s": timer.cpu_times[args.warmup:], "peak_gib": peak,
            "before_train_gib": rss_before,
            "trainable_params": trainable}


def run_in_subprocess(spec: RunSpec, args: argparse.Namespace, passthrough: list[str]) -> dict:
    command = [sys.executable, __file__, "--only", spec.name, "--json", *passthrough]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"{spec.name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def schedule(specs: list[RunSpec], baseline: RunSpec, rounds: int, baseline_every: int) -> list[RunSpec]:
    """Run order: per round, the MTP configurations rotated by one, with the baseline before, between and after."""
    order: list[RunSpec] = []
    for r in range(rounds):
        rotated = specs[r % len(specs):] + specs[: r % len(specs)]
        order.append(baseline)
        for i, spec in enumerate(rotated, start=1):
            order.append(spec)
            if i % baseline_every == 0 and i < len(rotated):
                order.append(baseline)
        order.append(baseline)
    return order


def _summary(runs: list[dict], key: str) -> float:
    """Step times: the fastest timed step over all runs of a configuration (interference from other processes
    only ever adds time, so the minimum is the least disturbed estimate). Memory: the median over runs."""
    values = [v for r in runs for v in (r[key] if isinstance(r[key], list) else [r[key]])]
    return min(values) if key in ("step_s", "cpu_s") else statistics.median(values)


def report(results: dict[str, list[dict]], baseline: str, bar_time: float, bar_memory: float) -> str:
    """The table of medians and ratios to the baseline, and the bar's verdict for K = 4."""
    base = {key: _summary(results[baseline], key) for key in ("step_s", "cpu_s", "peak_gib")}
    lines = [f"{'configuration':<20} {'step s':>7} {'x wall':>7} {'cpu s':>7} {'x cpu':>6} {'peak GiB':>9} "
             f"{'x mem':>6} {'trainable':>11}  runs"]
    ratios = {}
    for name, runs in results.items():
        value = {key: _summary(runs, key) for key in base}
        ratios[name] = {key: value[key] / base[key] for key in base}
        lines.append(f"{name:<20} {value['step_s']:7.1f} {ratios[name]['step_s']:7.3f} {value['cpu_s']:7.1f} "
                     f"{ratios[name]['cpu_s']:6.3f} {value['peak_gib']:9.2f} {ratios[name]['peak_gib']:6.3f} "
                     f"{runs[0]['trainable_params']:>11,}  {len(runs)}")
    lines.append("")
    for name, ratio in ratios.items():
        if RunSpec.parse(name).num_heads == 4:
            meets_wall = ratio["step_s"] <= bar_time and ratio["peak_gib"] <= bar_memory
            meets_cpu = ratio["cpu_s"] <= bar_time and ratio["peak_gib"] <= bar_memory
            lines.append(f"bar ({bar_time}x time, {bar_memory}x memory) {name:<18}: wall {ratio['step_s']:.3f}x, "
                         f"cpu {ratio['cpu_s']:.3f}x, memory {ratio['peak_gib']:.3f}x -> "
                         f"{'meets' if meets_wall else 'misses'} (wall), {'meets' if meets_cpu else 'misses'} (cpu)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 2, 4], help="values of K")
    parser.add_argument("--head-types", nargs="+", default=["ffn", "sequential"])
    parser.add_argument("--trunks", nargs="+", default=["frozen", "lora"], choices=["frozen", "lora"])
    parser.add_argument("--sample-rates", type=float, nargs="+", default=[1.0],
                        help="MTPConfig.head_loss_sample_rate values (1.0: every target, the exact loss)")
    parser.add_argument("--draft-vocab", type=int, nargs="+", default=[0],
                        help="MTPConfig.draft_vocab_size values (0: the whole vocabulary)")
    parser.add_argument("--extra", nargs="*", default=["lora+4xffn/v8192", "lora+4xsequential/v8192"],
                        help="more configurations by name, run after the others (default: K=4 LoRA heads with a "
                             "draft vocabulary of 8,192 tokens)")
    parser.add_argument("--warmup", type=int, default=1, help="steps run before timing")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=1, help="passes over all configurations")
    parser.add_argument("--baseline-every", type=int, default=6, help="rerun the baseline after this many runs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even when CUDA is available")
    parser.add_argument("--only", help="run one configuration in this process (e.g. sft-lora, lora+4xffn)")
    parser.add_argument("--json", action="store_true", help="with --only: print the result as JSON")
    parser.add_argument("--bar-time", type=float, default=1.25)
    parser.add_argument("--bar-memory", type=float, default=1.15)
    args = parser.parse_args(argv)

    if args.only:
        result = run_one(RunSpec.parse(args.only), args)
        print(json.dumps(result) if args.json else result, flush=True)
        return

    passthrough = [f"--batch={args.batch}", f"--seq={args.seq}", f"--layers={args.layers}", f"--vocab={args.vocab}",
                   f"--warmup={args.warmup}", f"--steps={args.steps}", f"--threads={args.threads}"]
    passthrough += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    passthrough += ["--cpu"] if args.cpu else []
    baseline = RunSpec(trunk="lora")
    specs = [RunSpec(trunk, k, head_type, rate, vocab) for trunk in args.trunks for head_type in args.head_types
             for rate in args.sample_rates for vocab in args.draft_vocab for k in args.heads]
    specs += [RunSpec.parse(name) for name in args.extra]
    order = schedule(specs, baseline, args.rounds, args.baseline_every)
    print(f"{len(order)} runs, batch {args.batch} x {args.seq}, {args.layers} layers, vocab {args.vocab}", flush=True)
    results: dict[str, list[dict]] = {baseline.name: []}
    for index, spec in enumerate(order, start=1):
        result = run_in_subprocess(spec, args, passthrough)
        results.setdefault(spec.name, []).append(result)
        steps = ", ".join(f"{t:.1f}/{c:.1f}" for t, c in zip(result["step_s"], result["cpu_s"]))
        print(f"[{index}/{len(order)}] {spec.name:<20} steps (wall/cpu) {steps} s, peak {result['peak_gib']:.2f} GiB "
              f"({result['wall_s']:.0f} s)", flush=True)
    print()
    print(report(results, baseline.name, args.bar_time, args.bar_memory))


if __name__ == "__main__":
    main()
