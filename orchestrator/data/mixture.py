"""A weighted mixture of prepared sources: exact counts, seeded, the same on every world size.

Each source (``data.sources[i]``, a DataConfig of its own: data.* with the source's settings
over it) is prepared into its own cache entry, exactly as a single ``data.path`` would be, so a
source shared by several mixtures or reruns is tokenized once. The mixture is then a draw over
the *prepared examples* (after malformed rows are skipped and too-long ones dropped), so the
counts are the counts trained on:

- ``rows: k`` takes exactly k examples of the source; more than it has repeats it, every
  example the same number of times (±1), each pass its own seeded permutation.
- ``weight: w`` gives each source the share w / sum(w) of ``data.mixture_rows`` examples,
  rounded by largest remainder so the counts sum exactly; left null, the size is the largest
  that draws no example twice (LLaMA-Factory's ``first_exhausted``, made exact).

The draw is a pure function of the sources' sizes, the counts and data.split_seed: it never
depends on the world size, the rank or the trainer's seed, and it is written into a mixture
entry of the cache (which examples of which source, in order), so every rank reads the same
one and a resume finds it again; the StepSampler then orders it per epoch as it does any set.
Eval rows are every source's own eval rows (its eval_fraction, eval_split or eval_path), plus
data.eval_path's, all of them, undrawn.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..config import DataConfig
from ..config.data import eval_source_config, source_config
from .cache import VERSION, example_lengths, lookup, new_entry, publish
from .sources import DataError
from .tokenize import Example

MIXTURE_FILE = "mixture.json"


def source_name(spec: dict, i: int) -> str:
    """A source as the reports name it: its ``name``, else its path (and split)."""
    if spec.get("name"):
        return str(spec["name"])
    split = spec.get("split")
    return spec["path"] + (f":{split}" if split and split != "train" else "")


def counts(available: Sequence[int], specs: Sequence[dict], total: Optional[int]) -> list[int]:
    """Examples drawn from each source: its ``rows``, or its weight's exact share of ``total``
    (largest remainder); ``total`` None: the largest mixture that repeats no example."""
    if any("rows" in s for s in specs):
        return [int(s["rows"]) for s in specs]
    weights = np.asarray([float(s.get("weight", 1.0)) for s in specs])
    share = weights / weights.sum()
    if total is None:
        total = int(min(math.floor(n / p + 1e-9) for n, p in zip(available, share)))
    exact = share * total
    out = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - out), kind="stable")  # ties: the earlier source
    out[order[: total - int(out.sum())]] += 1
    return [int(c) for c in out]


def draw(n: int, count: int, seed: int, source: int) -> np.ndarray:
    """``count`` indices into a source of ``n`` examples: whole seeded permutations, then the
    start of one more (no index twice before every index once)."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64([seed, source]))
    passes = [rng.permutation(n) for _ in range(-(-count // n))]
    return np.concatenate(passes)[:count] if passes else np.zeros(0, dtype=np.int64)


class Mixed(Sequence[Example]):
    """Examples of several prepared sets: position i is example ``index[i]`` of set ``part[i]``."""

    def __init__(self, parts: Sequence[Sequence[Example]], part: np.ndarray, index: np.ndarray) -> None:
        self._parts, self._part, self._index = parts, part, index

    def __len__(self) -> int:
        return len(self._part)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._parts[int(self._part[i])][int(self._index[i])]

    def lengths(self) -> np.ndarray:
        """Every example's token count, from the parts' length columns (no token is read)."""
        each = [example_lengths(p) for p in self._parts]
        out = np.zeros(len(self), dtype=np.int64)
        for k, lengths in enumerate(each):
            at = self._part == k
            out[at] = lengths[self._index[at]]
        return out


def _all(parts: Sequence[Sequence[Example]]) -> Mixed:
    part = np.concatenate([np.full(len(p), k, dtype=np.int64) for k, p in enumerate(parts)] or [np.zeros(0, np.int64)])
    index = np.concatenate([np.arange(len(p), dtype=np.int64) for p in parts] or [np.zeros(0, np.int64)])
    return Mixed(parts, part, index)


Prepared = Any  # data.Splits (train, eval, fingerprint, stats, cache_hit); not imported: no cycle


def prepare(cfg: DataConfig, tokenizer, prepare_one: Callable[[DataConfig, Any], Prepared],
            root: Path) -> tuple[Sequence[Example], Sequence[Example], str, dict, bool]:
    """Prepare every source (and data.eval_path), draw the mixture, and write (or find) its
    entry under ``root``: (train, eval, key, stats, all found in the cache)."""
    specs = list(cfg.sources)
    parts = []
    for i in range(len(specs)):
        try:
            parts.append(prepare_one(source_config(cfg, i), tokenizer))
        except DataError as exc:
            raise DataError(f"data.sources[{i}] ({source_name(specs[i], i)}): {exc}") from None
    eval_part = None
    if cfg.eval_path:
        try:
            eval_part = prepare_one(eval_source_config(cfg), tokenizer)
        except DataError as exc:
            raise DataError(f"data.eval_path: {str(exc).removeprefix('data.path: ')}") from None
    key = _key(cfg, [p.fingerprint for p in parts], eval_part.fingerprint if eval_part else None)
    if not (root / key / MIXTURE_FILE).exists():
        _write(cfg, root / key, parts, eval_part)
    found = load(root, key)
    assert found is not None
    train, evals, stats = found
    return train, evals, key, stats, all(p.cache_hit for p in parts)


def _key(cfg: DataConfig, sources: list[str], eval_source: Optional[str]) -> str:
    spec = {"version": VERSION, "sources": sources, "eval": eval_source, "seed": cfg.split_seed,
            "mixture_rows": cfg.mixture_rows,
            "amounts": [{k: s[k] for k in ("weight", "rows") if k in s} for s in cfg.sources]}
    return "mix-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _write(cfg: DataConfig, entry: Path, parts: list, eval_part) -> None:
    available = [len(p.train) for p in parts]
    drawn = counts(available, cfg.sources, cfg.mixture_rows)
    picks = [draw(n, c, cfg.split_seed, i) for i, (n, c) in enumerate(zip(available, drawn))]
    for i, (n, c) in enumerate(zip(available, drawn)):
        if c and not n:
            raise DataError(f"data.sources[{i}] ({source_name(cfg.sources[i], i)}): no usable examples to draw {c} from")
    part = np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(picks)])
    index = np.concatenate(picks)
    lengths = [example_lengths(p.train) for p in parts]
    sources = []
    for i, (p, n, c, pick) in enumerate(zip(parts, available, drawn, picks)):
        s = p.stats.get("train", {})
        sources.append({"name": source_name(cfg.sources[i], i), "fingerprint": p.fingerprint,
                        "examples": n, "drawn": c, "repeats": round(c / n, 3) if n else 0.0,
                        "tokens_drawn": int(lengths[i][pick].sum()),
                        "eval_examples": len(p.eval),
                        **{k: s.get(k, 0) for k in ("skipped_rows", "truncated", "dropped_too_long")}})
    train_stats = {"examples": int(len(part)), "truncated": sum(x["truncated"] for x in sources),
                   "skipped_rows": sum(x["skipped_rows"] for x in sources),
                   "dropped_too_long": sum(x["dropped_too_long"] for x in sources)}
    n_eval = sum(len(p.eval) for p in parts) + (len(eval_part.train) if eval_part else 0)
    meta = {"sources": sources, "train": train_stats, "eval": {"examples": n_eval},
            "eval_path": {"fingerprint": eval_part.fingerprint, "examples": len(eval_part.train)} if eval_part else None}
    tmp = new_entry(entry)
    try:
        np.save(tmp / "part.npy", part)
        np.save(tmp / "index.npy", index)
        (tmp / MIXTURE_FILE).write_text(json.dumps(meta, indent=1))
    except BaseException:  # a full disk mid-entry: nothing partial stays in the cache
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, entry, {"train": train_stats, "eval": meta["eval"], "sources": sources})


def load(root: Path, key: str) -> Optional[tuple[Mixed, Mixed, dict]]:
    """(train, eval, stats) of the mixture entry ``key``, over its sources' entries (found by
    their fingerprints, so a rank reads it without hashing any data); None if any is missing."""
    entry = root / key
    if not (entry / MIXTURE_FILE).exists():
        return None
    meta = json.loads((entry / MIXTURE_FILE).read_text())
    found = [lookup(root / s["fingerprint"]) for s in meta["sources"]]
    extra = [lookup(root / meta["eval_path"]["fingerprint"])] if meta.get("eval_path") else []
    if any(f is None for f in found + extra):
        return None
    part, index = np.load(entry / "part.npy"), np.load(entry / "index.npy")
    stats = {"train": meta["train"], "eval": meta["eval"], "sources": meta["sources"]}
    return (Mixed([f[0] for f in found], part, index),
            _all([f[1] for f in found] + [f[0] for f in extra]), stats)


def describe_sources(stats: dict) -> list[str]:
    """One line per source: prepared, drawn (and repeats), tokens drawn, what was left out."""
    lines = []
    for i, s in enumerate(stats.get("sources", [])):
        line = (f"data source {i} ({s['name']}): {s['drawn']} of {s['examples']} examples drawn"
                + (f" ({s['repeats']}x, repeated)" if s["drawn"] > s["examples"] else "")
                + f", {s['tokens_drawn']} tokens")
        for key, what in (("skipped_rows", "malformed rows skipped"), ("truncated", "truncated"),
                          ("dropped_too_long", "too long dropped")):
            if s.get(key):
                line += f", {s[key]} {what}"
        if s.get("eval_examples"):
            line += f"; {s['eval_examples']} eval examples"
        lines.append(line)
    return lines
