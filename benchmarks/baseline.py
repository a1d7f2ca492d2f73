"""`orchestrate train` against a plain Hugging Face Trainer + PEFT + bitsandbytes script.

    python benchmarks/baseline.py [--steps 40] [--model PATH] [--nproc 1] [-- extra overrides]
    python benchmarks/baseline.py -- data.packing=true        # pass overrides to orchestrate only

Both sides train the same model (4-bit NF4 with double quantization, LoRA r=16 / alpha 32 /
dropout 0.05 on every linear layer, AdamW, cosine schedule, clipping 1.0) on the same tokenized
examples (tiny_instruct by default), with the same micro-batch, accumulation, steps, seed and
precision (bf16 where the hardware has it). The baseline is what a user would write with
`transformers.Trainer`: dynamic padding to the longest row of each micro-batch, no packing.

Printed, from one run of each: non-padding tokens/s (steps after the first, so start-up and
warm-up are excluded on both sides), peak memory (process RSS on CPU, allocator peak on CUDA),
their ratios, and orchestrate's own overhead: launch to the end of the first step, and the
median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT
from orchestrator.tiny.random_llama import TINY

DATA = ROOT / "orchestrator" / "assets" / "tiny_instruct" / "train.jsonl"


def hf_worker(args: argparse.Namespace) -> dict:
    """The plain script: Trainer + PEFT + bitsandbytes, one process."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig,
                              DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments)

    from orchestrator.config import DataConfig
    from orchestrator.data import load_examples
    from orchestrator.distributed import peak_memory_mb, resolve_precision
    from orchestrator.model import disable_cpu_repacking

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = resolve_precision(args.precision, device)
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=dtype, device_map={"": 0 if cuda else "cpu"},
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype),
    )
    disable_cpu_repacking(model)  # bitsandbytes' CPU repacking pitfall (FACTS.md)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    examples = load_examples(args.data, tok, DataConfig(path=args.data, format=args.format,
                                                          max_seq_len=args.max_seq_len))
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    tokens: list[int] = []

    def counting_collate(batch):
        out = collate(batch)
        tokens.append(int(out["attention_mask"].sum()))
        return out

    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.t0)

    accum = args.global_batch // args.micro_batch
    targs = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=accum, learning_rate=2e-3, lr_scheduler_type="cosine",
        warmup_steps=2, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, logging_steps=10**9,
        save_strategy="no", report_to=[], seed=args.seed, dataloader_num_workers=0,
        use_cpu=not cuda, remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=counting_collate,
                      callbacks=[Timer()])
    trainer.train()
    per_step = [sum(tokens[i * accum:(i + 1) * accum]) for i in range(len(step_times))]
    warm = slice(1, None)
    return {
        "tokens_per_s": sum(per_step[warm]) / sum(step_times[warm]),
        "median_step_s": statistics.median(step_times[warm]),
        "peak_mb": peak_memory_mb(device),
    }


def run_baseline(args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--hf-worker", "--out", str(out), "--steps", str(args.steps),
           "--model", str(args.model), "--data", str(args.data), "--format", args.format,
           "--micro-batch", str(args.micro_batch),
           "--global-batch", str(args.global_batch), "--max-seq-len", str(args.max_seq_len),
           "--precision", args.precision, "--seed", str(args.seed)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"baseline failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_orchestrate(args: argparse.Namespace, run_dir: Path) -> dict:
    """`orchestrate train` with the same settings; times launch to the first logged step."""
    cmd = [sys.executable, "-m", "launch", "train", f"run.dir={run_dir}", f"model.path={args.model}",
           f"data.path={args.data}", f"data.format={args.format}", "data.eval_path=null",
           f"data.max_seq_len={args.max_seq_len}",
           f"trainer.max_steps={args.steps}", f"trainer.micro_batch_size={args.micro_batch}",
           f"trainer.global_batch_size={args.global_batch}", f"trainer.precision={args.precision}",
           f"trainer.seed={args.seed}", "optim.lr=2e-3", "optim.warmup_steps=2", "trainer.save_every=0",
           f"launcher.nproc_per_node={args.nproc}", "logger=basic", "logger.console=false", *args.extra]
    metrics = run_dir / "metrics.jsonl"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_step_at = None
    while proc.poll() is None:
        if first_step_at is None and metrics.exists() and metrics.read_text().strip():
            first_step_at = time.perf_counter() - t0
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"orchestrate failed:\n{err[-3000:]}")
    wall = time.perf_counter() - t0
    steps = [json.loads(line) for line in metrics.read_text().splitlines() if '"loss"' in line]
    warm = steps[1:]
    tokens = sum(m["tokens_per_s"] * m["step_time_s"] for m in warm)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "tokens_per_s": tokens / sum(m["step_time_s"] for m in warm),
        "median_step_s": statistics.median(m["step_time_s"] for m in warm),
        "peak_mb": max(summary["peak_memory_mb"]),
        "launch_to_first_step_s": first_step_at,
        "wall_s": wall,
        "non_pad_share": statistics.mean(m["non_pad_share"] for m in warm),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--model", default=str(TINY))
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--format", default="alpaca", help="data.format of --data (alpaca, chat, text)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--nproc", type=int, default=1, help="orchestrate's ranks (the baseline is one process)")
    ap.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help="extra overrides for orchestrate only (after --)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.hf_worker:
        print(json.dumps(hf_worker(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = run_baseline(args, Path(tmp) / "hf")
        ours = run_orchestrate(args, Path(tmp) / "orchestrate")
    print(f"steps {args.steps}, micro-batch {args.micro_batch}, global batch {args.global_batch}, "
          f"max_seq_len {args.max_seq_len}, orchestrate ranks {args.nproc}, "
          f"extra overrides: {' '.join(args.extra) or '-'}")
    print("| | tokens/s (non-pad) | median step s | peak MB/rank |")
    print("| --- | --- | --- | --- |")
    print(f"| HF Trainer + PEFT + bnb | {base['tokens_per_s']:.0f} | {base['median_step_s']:.3f} | {base['peak_mb']:.0f} |")
    print(f"| orchestrate train | {ours['tokens_per_s']:.0f} | {ours['median_step_s']:.3f} | {ours['peak_mb']:.0f} |")
    print(f"| ratio (orchestrate / baseline) | {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
          f"{ours['median_step_s'] / base['median_step_s']:.2f}x | {ours['peak_mb'] / base['peak_mb']:.2f}x |")
    print(f"orchestrate: launch to first step {ours['launch_to_first_step_s']:.1f} s, whole run "
          f"{ours['wall_s']:.1f} s, non-padding share of positions {ours['non_pad_share']:.2f}")


if __name__ == "__main__":
    main()
