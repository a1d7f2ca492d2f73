"""``orchestrate``: parse the command line and dispatch; the shared steps live in ``prepare``.

Hydra composes exactly once, here. Ranks never re-compose: they read the frozen, resolved
``config.yaml`` from the run directory, so a restarted rank, a requeued job and a resumed run
all see the same config (DESIGN.md).

Every error a user can fix (a bad override, a missing file, a bad row) is reported as one line
naming the problem, with exit code 2 and no traceback.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from launch.prepare import (
    UsageError, build_config, check_world, compose, layout, preflight, prepare_run_dir, ranks_per_node,
    world_size,
)

USAGE = """usage: orchestrate [--version] COMMAND [ARGS]

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
  generate run_dir=PATH [prompt=TEXT [input=TEXT] | file=PROMPTS.jsonl] [max_new_tokens=N]
           [temperature=T] [top_p=P] [top_k=K] [seed=S] [merged=true|DIR]
                                      answer prompts with the trained adapter, formatted as in
                                      training (greedy unless temperature>0); no prompt: interactive
  status [RUN_DIR | SWEEP_DIR ...]    one line per run (default: every run under run.root, newest
                                      first): state, step, loss, eval loss, tokens/s, ETA, latest
                                      checkpoint, Slurm job and its state; sweeps with their trials
  report RUN_DIR [RUN_DIR ...] [out=PNG]
                                      curves.png (train/eval loss, lr, tokens/s over steps; runs or
                                      a sweep's trials overlaid) and each finished run's table

train and plan also take --config-dir DIR: your own config tree beside ours (presets under
DIR/model/, DIR/launcher/, ...; sbatch templates by name relative to DIR); it is short for
hydra.searchpath=[file://DIR]

examples:
  orchestrate train                                    # embedded tiny model and data, 2 CPU ranks
  orchestrate train model.path=/models/llama-3-8b data.path=train.jsonl trainer.max_steps=1000
  orchestrate train --cfg job quant=none               # print the composed config, run nothing
  orchestrate train --config-dir ~/team-conf launcher=our_cluster model=our_llama
  orchestrate train -m optim.lr=1e-4,3e-4 lora.r=8,16  # 2x2 grid sweep
  orchestrate train -m sweep=optuna sweep.n_trials=20  # Optuna search (conf/sweep/optuna.yaml)
  orchestrate plan model=llama3_70b strategy=fsdp strategy.shard_base=true \
      launcher.nproc_per_node=2 plan.gpu_memory_gb=24 # will it fit two 24 GB GPUs?
"""

def _config_dirs(args: list[str]) -> list[str]:
    from launch.config_dirs import ConfigDirError, expand

    try:
        return expand(args)
    except ConfigDirError as exc:
        raise UsageError(str(exc)) from exc


def cmd_train(args: list[str]) -> int:
    from omegaconf import OmegaConf

    args = _config_dirs(args)
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
    agent = None
    if cfg.launcher.name == "local":
        from launch.local import PendingAgent

        agent = PendingAgent()  # torchrun imports torch while the checks below run
    try:
        return _train(cfg, args, agent)
    finally:
        if agent is not None:
            agent.cancel()


def _train(cfg, args: list[str], agent) -> int:
    preflight(cfg)
    run_dir = prepare_run_dir(cfg, args)
    if layout(cfg):
        print(f"strategy=fsdp: {layout(cfg)}", file=sys.stderr if getattr(cfg.launcher, "dry_run", False)
              else sys.stdout, flush=True)
    if cfg.launcher.name == "slurm":
        from launch.slurm import SlurmError, submit

        try:
            return submit(cfg, run_dir)
        except SlurmError as exc:
            raise UsageError(str(exc)) from exc
    from launch.local import launch
    from orchestrator import rundir

    print(f"run directory: {run_dir}", flush=True)
    started = time.monotonic()
    rc = launch(cfg, run_dir, agent=agent)
    state = rundir.read_state(run_dir)
    if rc == 0 and (run_dir / "summary.json").exists():
        from launch.report import CURVES, summary_table, write_curves

        write_curves([run_dir], run_dir / CURVES)
        print(f"\n{summary_table(run_dir, time.monotonic() - started)}", flush=True)
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
    args = _config_dirs(args)
    bad = [a for a in args if a.startswith("-")]
    if bad:
        raise UsageError(f"unknown option {bad[0]!r}; overrides are KEY=VALUE (see orchestrate --help)")
    from launch.auto import prepared_lengths
    from orchestrator.data import DataError
    from orchestrator.plan import PlanError, report

    cfg = build_config(args)
    check_world(cfg)
    if (Path(cfg.model.path) / "config.json").exists():
        from launch.model_checks import check_family

        check_family(cfg)  # the same refusals as train: its numbers are for what would load
    try:  # at the data's real lengths where its tokenizer is local, else at data.max_seq_len
        text, fits = report(cfg, world_size(cfg), prepared_lengths(cfg), ranks_per_node(cfg))
    except (PlanError, DataError) as exc:
        raise UsageError(str(exc)) from exc
    print(text)
    print()
    print(comm_section(cfg))
    return 0 if fits else 1


def comm_section(cfg) -> str:
    """What each rank sends per step, intra- and inter-node, and how long that takes at least."""
    from orchestrator.plan import comm_plan_for_run, compute_seconds, format_comm

    world = world_size(cfg)
    plan = comm_plan_for_run(cfg, world, ranks_per_node(cfg))
    p = cfg.plan
    compute = compute_seconds(cfg, world, p.gpu_tflops) if p.device == "cuda" else None
    text = format_comm(plan, p.intra_node_gb_per_s, p.inter_node_gbit_per_s, compute)
    from orchestrator.plan.recommend import recommend

    best = recommend(cfg, world, ranks_per_node(cfg))
    if best is None:
        return text + "\nno strategy fits this shape's memory; see the suggestions above"
    return (text + f"\nrecommended for this job shape: {best.overrides} (fits at "
            f"{best.peak_bytes / 2**30:.2f} GiB per rank; >= {best.comm_s * 1e3:.1f} ms of communication per step)")


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
    if args[0] in ("--version", "-V"):
        from orchestrator.runinfo import describe_code

        print(describe_code())
        return 0
    command, rest = args[0], args[1:]
    from launch.generate import cmd_generate
    from launch.report import cmd_report
    from launch.status import cmd_status

    commands = {"train": cmd_train, "plan": cmd_plan, "merge": cmd_merge,
                "sweep-report": cmd_sweep_report, "generate": cmd_generate, "report": cmd_report,
                "status": cmd_status}
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
