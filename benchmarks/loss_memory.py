"""Memory and time of the loss at a real vocabulary: plain (full logits) against chunked.

    python benchmarks/loss_memory.py [--tokens 512] [--vocab 151936] [--hidden 576] [--labelled 0.6]
                                     [--precision bf16|fp32]

One output head step (forward and backward of head + cross-entropy, under bf16 autocast as in
training, or in fp32 where bf16 would only be emulated: the default follows the hardware, as
in peer.py; the head frozen as under LoRA) in a fresh process per variant; reported: the peak
memory above the inputs (process peak RSS on CPU, allocator peak on CUDA), the time, and that
loss and input gradient agree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker(kind: str, args: argparse.Namespace) -> dict:
    import torch

    from orchestrator.distributed import peak_memory_mb
    from orchestrator.loss import build_loss, plain_loss

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False).to(dev).requires_grad_(False)
    hidden = torch.randn(2, args.tokens // 2, args.hidden, device=dev, requires_grad=True)
    labels = torch.randint(0, args.vocab, (2, args.tokens // 2), device=dev)
    labels[torch.rand(labels.shape, device=dev) > args.labelled] = -100

    class Model(torch.nn.Module):  # hidden states in, the head's output out, like a CausalLM
        def __init__(self):
            super().__init__()
            self.lm_head = head

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, h, use_cache=False):
            return type("Out", (), {"logits": self.lm_head(h)})

    model = Model()
    fn = plain_loss if kind == "plain" else build_loss("chunked", model)[0]
    for _ in range(2):  # the second run is measured; the first warms allocator and kernels
        hidden.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = peak_memory_mb(dev) if dev.type == "cuda" else None
        t0 = time.perf_counter()
        autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if args.precision == "bf16"
                    else contextlib.nullcontext())
        with autocast:
            loss = fn(model, {"h": hidden}, labels)
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return {"loss": float(loss), "time_s": dt, "peak_mb": peak_memory_mb(dev),
            "grad_norm": float(hidden.grad.float().norm())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--labelled", type=float, default=0.6, help="share of positions with a label")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                    help="default: bf16 where the hardware has it, else fp32")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.precision is None:
        from common import native_precision

        args.precision = native_precision()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    out = {}
    for kind in ("baseline", "plain", "chunked"):
        # baseline: the same process and inputs with 2 positions; what the loss adds is above it
        worker_kind, extra = ("plain", ["--tokens", "2"]) if kind == "baseline" else (kind, [])
        cmd = [sys.executable, __file__, "--worker", worker_kind, *sys.argv[1:], *extra,
               "--precision", args.precision]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            sys.exit(proc.stderr[-2000:])
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = out["baseline"]["peak_mb"]
    p, c = out["plain"], out["chunked"]
    print(f"{args.tokens} positions ({args.labelled:.0%} labelled), vocabulary {args.vocab}, "
          f"hidden {args.hidden}, {args.precision}")
    print("| loss | peak MB above inputs | time s | loss value | input-grad norm |")
    print("| --- | --- | --- | --- | --- |")
    for k in ("plain", "chunked"):
        r = out[k]
        print(f"| {k} | {r['peak_mb'] - base:.0f} | {r['time_s']:.3f} | {r['loss']:.2f} | {r['grad_norm']:.5f} |")
    print(f"memory cut {(p['peak_mb'] - base) / max(c['peak_mb'] - base, 1):.1f}x, "
          f"time {p['time_s'] / c['time_s']:.2f}x faster")


if __name__ == "__main__":
    main()
