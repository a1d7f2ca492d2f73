"""``orchestrate``: parse the command line and dispatch; the shared steps live in ``prepare``.

Hydra composes exactly once, here. Ranks never re-compose: they read the frozen, resolved
``config.yaml`` from the run directory, so a restarted rank, a requeued job and a resumed run
all see the same config (DESIGN.md).

Every error a user can fix (a bad override, a missing file, a bad row) is reported as one line
naming the problem, with exit code 2 and no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from launch.prepare import (
    UsageError, build_config, check_world, compose, preflight, prepare_run_dir, world_size,
)

USAGE = """usage: orchestrate COMMAND [ARGS]

commands:
  train [--cfg job] [KEY=VALUE ...]   compose conf/ with overrides and train (torchrun on this node)
  train -m [KEY=a,b ...]              sweep: one trial per combination (grid), or an Optuna study
                                      with sweep=optuna; trials run one after another here or as
                                      one Slurm job array with launcher=slurm
  sweep-report SWEEP_DIR              trials ranked by eval loss: table, report.csv, report.png
  plan [KEY=VALUE ...]                print the memory per rank the run would need (no weights loaded;
                                      shapes from the model's config.json), whether it fits
                                      plan.gpu_memory_gb, and what to change when it does not
  merge run_dir=PATH [out=PATH] [dtype=bf16|fp16|fp32]
                                      merge a run's adapter into the dequantized base and save a
                                      standard transformers model directory (default RUN/merged)

examples:
  orchestrate train                                    # embedded tiny model and data, 2 CPU ranks
  orchestrate train model.path=/models/llama-3-8b data.path=train.jsonl trainer.max_steps=1000
  orchestrate train --cfg job quant=none               # print the composed config, run nothing
  orchestrate train -m optim.lr=1e-4,3e-4 lora.r=8,16  # 2x2 grid sweep
  orchestrate train -m sweep=optuna sweep.n_trials=20  # Optuna search (conf/sweep/optuna.yaml)
  orchestrate plan model=llama3_70b strategy=fsdp strategy.shard_base=true \
      launcher.nproc_per_node=2 plan.gpu_memory_gb=24 # will it fit two 24 GB GPUs?
"""

def cmd_train(args: list[str]) -> int:
    from omegaconf import OmegaConf

    if "-m" in args or "--multirun" in args:
        from launch.sweep import run_sweep

        return run_sweep([a for a in args if a not in ("-m", "--multirun")])
    cfg_mode: Optional[str] = None
    if "--cfg" in args:
        i = args.index("--cfg")
        if i + 1 >= len(args) or args[i + 1] not in ("job", "all"):
            raise UsageError("--cfg takes 'job' or 'all'")
        cfg_mode = args[i + 1]
        args = args[:i] + args[i + 2:]
    bad = [a for a in args if a.startswith("-")]
    if bad:
        raise UsageError(f"unknown option {bad[0]!r}; overrides are KEY=VALUE (see orchestrate --help)")
    if cfg_mode:
        composed = compose(args)
        build_config(args)  # validate too, so --cfg shows only configs that would run
        print(OmegaConf.to_yaml(composed, resolve=True), end="")
        return 0
    cfg = build_config(args)
    preflight(cfg)
    run_dir = prepare_run_dir(cfg, args)
    if cfg.launcher.name == "slurm":
        from launch.slurm import SlurmError, submit

        try:
            return submit(cfg, run_dir)
        except SlurmError as exc:
            raise UsageError(str(exc)) from exc
    from launch.local import launch
    from orchestrator import rundir

    print(f"run directory: {run_dir}", flush=True)
    rc = launch(cfg, run_dir)
    state = rundir.read_state(run_dir)
    if rc == 0 and (run_dir / "summary.json").exists():
        print(f"outputs: {run_dir}/adapter (PEFT adapter), {run_dir}/summary.json, "
              f"{run_dir}/metrics.jsonl, {run_dir}/checkpoints", flush=True)
        print((run_dir / "summary.json").read_text(), end="")
    elif state.get("state") == "stopped" and rc in (0, state.get("exit_code")):
        print(f"stopped on {state.get('reason')} at step {state.get('step')}: "
              f"{rundir.resume_hint(run_dir)}", file=sys.stderr, flush=True)
        rc = state.get("exit_code", 0)
    elif state.get("state") == "failed" and state.get("reason", "").startswith("killed on a second"):
        print(f"{state['reason']}: stopped at once; {rundir.resume_hint(run_dir)}", file=sys.stderr,
              flush=True)
    else:
        if state.get("state") in (None, "running"):
            rundir.write_state(run_dir, "failed", reason=f"ranks exited with code {rc}", exit_code=rc)
        print(f"training failed (exit code {rc}); {rundir.resume_hint(run_dir)}",
              file=sys.stderr, flush=True)
    return rc


def cmd_plan(args: list[str]) -> int:
    """Exit 0 when the run fits plan.gpu_memory_gb, 1 when it does not."""
    bad = [a for a in args if a.startswith("-")]
    if bad:
        raise UsageError(f"unknown option {bad[0]!r}; overrides are KEY=VALUE (see orchestrate --help)")
    from orchestrator.plan import PlanError, report

    cfg = build_config(args)
    check_world(cfg)
    try:
        text, fits = report(cfg, world_size(cfg))
    except PlanError as exc:
        raise UsageError(str(exc)) from exc
    print(text)
    return 0 if fits else 1


def cmd_merge(args: list[str]) -> int:
    opts = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = [a for a in args if "=" not in a] + [k for k in opts if k not in ("run_dir", "out", "dtype")]
    if unknown:
        raise UsageError(f"merge: unknown argument {unknown[0]!r}; expected run_dir=PATH [out=PATH] [dtype=bf16|fp16|fp32]")
    if "run_dir" not in opts:
        raise UsageError("merge: run_dir=PATH is required")
    from orchestrator.export import ExportError, merge_run

    try:
        out = merge_run(Path(opts["run_dir"]), Path(opts["out"]) if "out" in opts else None,
                        opts.get("dtype", "bf16"))
    except ExportError as exc:
        raise UsageError(str(exc)) from exc
    print(f"merged model: {out}")
    return 0


def cmd_sweep_report(args: list[str]) -> int:
    if len(args) != 1 or args[0].startswith("-"):
        raise UsageError("sweep-report takes one argument: the sweep directory")
    from launch.sweep_report import report
    from launch.sweep_store import SweepDirError

    try:
        print(report(Path(args[0]).resolve()))
    except SweepDirError as exc:
        raise UsageError(str(exc)) from exc
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = args[0], args[1:]
    commands = {"train": cmd_train, "plan": cmd_plan, "merge": cmd_merge,
                "sweep-report": cmd_sweep_report}
    try:
        if command not in commands:
            raise UsageError(f"unknown command {command!r}; choose one of: {', '.join(commands)}")
        return commands[command](rest)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a launch (during one, the launcher handles it)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
