"""Model sizes the benchmarks use, built with orchestrator.tiny.random_llama (random weights,
the embedded tokenizer, so they train on tiny_instruct offline). Loss values mean nothing
here; memory and speed do.

    python benchmarks/synthetic.py SIZE OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from orchestrator.tiny.random_llama import TINY, build  # noqa: E402

#: name -> (hidden, intermediate, layers, heads, kv_heads); multiples of 32 (FACTS.md).
SIZES = {
    "micro": (64, 128, 1, 2, 2),          # ~0.03M: only the runtime's own memory is left
    "20m": (512, 1408, 6, 8, 4),          # ~17M: the planner's CPU calibration model
    "50m": (768, 2048, 8, 12, 4),         # ~50M parameters
    "1b": (2048, 5632, 22, 32, 4),        # ~1.0B (TinyLlama-1.1B's shape, vocabulary 128)
}


def build_llama(out_dir: Path, size: str) -> Path:
    """The ``size`` model in ``out_dir``, built unless it is already there."""
    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists():
        return out_dir
    hidden, inter, layers, heads, kv = SIZES[size]
    return build(out_dir, hidden, inter, layers, heads=heads, kv_heads=kv)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in SIZES:
        sys.exit(f"usage: python benchmarks/synthetic.py {{{','.join(SIZES)}}} OUT_DIR")
    print(build_llama(Path(sys.argv[2]), sys.argv[1]))
