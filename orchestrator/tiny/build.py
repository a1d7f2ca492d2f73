"""Build the embedded default assets: the tiny_instruct dataset and the pretrained tiny-llama.

    python -m orchestrator.tiny.build [--out-dir orchestrator/assets] [--pretrain-steps N]

Writes ``tiny_instruct/{train,eval}.jsonl`` and ``tiny-llama/`` (tokenizer, a bfloat16
``LlamaForCausalLM`` pretrained from scratch on CPU on plain-prose statements of the same tasks,
and ``BUILD.md``). Everything is seeded; a run takes a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Idle tokenizer worker threads would compete with torch for the two cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from .tasks import TASKS, make_examples, make_pretrain_statements, make_pretrain_text, pairs  # noqa: E402
from .tokenizer import build_tokenizer  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets"


def model_config(tok) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")


def packed_sequences(tok, n_seqs: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n_seqs`` rows of ``seq_len`` tokens: ``<s> line </s>`` packed back to back."""
    need = n_seqs * seq_len
    ids: list[int] = []
    chunk = 0
    while len(ids) < need:
        lines = make_pretrain_text(20000, seed=seed * 1000 + chunk)
        for enc in tok(lines, add_special_tokens=True)["input_ids"]:
            ids.extend(enc)
            ids.append(tok.eos_token_id)
        chunk += 1
    return torch.tensor(ids[:need], dtype=torch.long).view(n_seqs, seq_len)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model, data: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> float:
    """AdamW with linear warmup then cosine to 10%; returns the mean loss of the last 50 steps."""
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )
    warmup = max(1, steps // 20)
    model.train()
    order = torch.randperm(len(data), generator=gen)
    pos, recent, t0 = 0, [], time.time()
    for step in range(steps):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(data), generator=gen), 0
        x = data[order[pos:pos + batch]]
        pos += batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-50:]
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"step {step + 1:5d}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  {time.time() - t0:.0f}s", flush=True)
    model.eval()
    return sum(recent) / len(recent)


@torch.no_grad()
def greedy(model, tok, prompts: list[str], max_new_tokens: int = 16, batch: int = 64) -> list[str]:
    """Greedy completions (text after the prompt, up to ``</s>`` or a newline-free stop)."""
    outs = []
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        for i in range(0, len(prompts), batch):
            enc = tok(prompts[i:i + batch], add_special_tokens=True, return_tensors="pt", padding=True)
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            )
            outs.extend(tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    finally:
        tok.padding_side = side
    return outs


def probe(model, tok, seed: int, n: int = 250) -> dict[str, float]:
    """Per-operation greedy accuracy at completing held-out prose statements (pretraining phrasing)."""
    stmts = make_pretrain_statements(n, seed=seed)
    outs = greedy(model, tok, [p for _, p, _, _ in stmts])
    good, total = {}, {}
    for (name, _, answer, suffix), out in zip(stmts, outs):
        total[name] = total.get(name, 0) + 1
        good[name] = good.get(name, 0) + (out == answer + suffix)
    acc = {name: good[name] / total[name] for name in total}
    acc["all"] = sum(good.values()) / n
    return acc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--pretrain-steps", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-eval", type=int, default=200)
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(2)
    out = args.out_dir
    data_dir, model_dir = out / "tiny_instruct", out / "tiny-llama"

    # 1. The instruction dataset; eval never repeats a train (instruction, input).
    train = make_examples(args.n_train, seed=args.seed)
    evals = make_examples(args.n_eval, seed=args.seed + 1, exclude=pairs(train))
    write_jsonl(data_dir / "train.jsonl", train)
    write_jsonl(data_dir / "eval.jsonl", evals)
    print(f"wrote {len(train)} train / {len(evals)} eval rows to {data_dir}", flush=True)

    # 2. Tokenizer and model, pretrained from scratch on prose statements of the tasks.
    tok = build_tokenizer()
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config(tok)).float()
    n_params = sum(p.numel() for p in model.parameters())
    pretrain_seed = args.seed + 100
    data = packed_sequences(tok, args.pretrain_steps * args.batch_size, args.seq_len, pretrain_seed)
    print(f"model {n_params / 1e6:.2f}M params; pretraining {args.pretrain_steps} steps x "
          f"{args.batch_size} x {args.seq_len} tokens", flush=True)
    final_loss = pretrain(model, data, args.pretrain_steps, args.batch_size, args.lr, args.seed)

    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    acc = probe(model, tok, seed=args.seed + 999)
    acc_text = ", ".join(f"{k} {v:.0%}" for k, v in acc.items())
    print(f"final pretraining loss {final_loss:.4f}; prose completion accuracy (bf16): {acc_text}")

    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tok.save_pretrained(model_dir)
    (model_dir / "model.safetensors").chmod(0o644)  # written 0600 by the safetensors writer
    elapsed = time.time() - t_start
    cmd = "python -m orchestrator.tiny.build " + " ".join(sys.argv[1:] if argv is None else argv)
    (model_dir / "BUILD.md").write_text(
        f"""# tiny-llama

A {n_params / 1e6:.2f}M-parameter `LlamaForCausalLM` (hidden 256, intermediate 768, 4 layers,
8 heads / 4 KV heads, vocab {len(tok)}, untied head) with a character-level tokenizer, stored in
bfloat16. Made by `orchestrator/tiny/build.py`; do not edit by hand, rebuild instead.

- Command: `{cmd.strip()}`
- Date: {datetime.date.today().isoformat()}
- Pretraining: from scratch, fp32 on CPU (2 threads), AdamW (betas 0.9/0.95, wd 0.01),
  peak lr {args.lr:g}, linear warmup {max(1, args.pretrain_steps // 20)} steps then cosine to
  10%, grad clip 1.0, {args.pretrain_steps} steps x {args.batch_size} sequences x
  {args.seq_len} tokens (`<s> line </s>` packed).
- Pretraining text: `make_pretrain_text` (seed {pretrain_seed}), prose in several phrasings
  such as `the reverse of the word mango is ognam.` / `23 plus 51 equals 74.` /
  `distance: 7 km\\nin m: 7000 m`; it never uses the instruction (Alpaca) template, so the
  base model gets ~0% on it until fine-tuned.
- Final pretraining loss (mean of last 50 steps): {final_loss:.4f} nats/token
- Greedy completion accuracy on 250 held-out prose statements (bf16): {acc_text}
- Seeds: torch.manual_seed({args.seed}); dataset seeds train={args.seed}, eval={args.seed + 1}
  (eval deduplicated against train on (instruction, input)).
- Tasks: {", ".join(repr(t[0]) for t in TASKS)}
- Build time: {elapsed:.0f} s
"""
    )
    print(f"wrote {model_dir} in {elapsed:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
