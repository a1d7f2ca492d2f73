"""Every model family x every strategy, trained for real on 2 ranks: the README's "Models" table.

    python benchmarks/families.py [--out DIR] [--families llama falcon ...] [--strategies ddp zero3 ...]

Each cell is one `orchestrate train` (2 CPU ranks, 2 steps, a tiny random model of the family
from orchestrator/tiny/families.py) and reads back summary.json: the bytes per matmul parameter
the base really holds (0.52 is NF4 with double quantization; MoE experts stay 16-bit and say
so) and whether the adapters computed in the run's precision. ~30 s a cell on 2 CPU cores.
MoE families run with quant.allow_unquantized=true (without it they are refused before launch).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import train  # noqa: E402
from strategies import STRATEGIES  # noqa: E402
from orchestrator.tiny.families import FAMILIES, MOE, build  # noqa: E402

COMMON = ["launcher.nproc_per_node=2", "trainer.max_steps=2", "trainer.global_batch_size=4",
          "trainer.micro_batch_size=1", "trainer.eval_generate_examples=0", "data.eval_path=null",
          "data.max_seq_len=128", "trainer.save_every=0"]


def cell(out: dict) -> str:
    if "error" in out:
        return "fails: " + out["error"][:80]
    s = out["summary"]
    dtype_ok = "" if s["forward_dtype"] == s["precision"] else f", adapters in {s['forward_dtype']}!"
    return f"ok, {s['base_storage']['bytes_per_param']:.2f} B/param{dtype_ok}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="families-"))
    print("| family | " + " | ".join(args.strategies) + " |")
    print("|---|" + "---|" * len(args.strategies))
    failed = 0
    for family in args.families:
        model = build(family, root / "models" / family)
        extra = ["quant.allow_unquantized=true"] if family in MOE else []
        cells = []
        for name in args.strategies:
            out = train(root / family / name.replace(" ", "_"),
                        [f"model.path={model}", *COMMON, *STRATEGIES[name], *extra])
            cells.append(cell(out))
            failed += "error" in out
        print(f"| {family}{' (experts 16-bit)' if family in MOE else ''} | " + " | ".join(cells) + " |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
