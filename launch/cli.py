"""``orchestrate``: compose the config once, validate it, make the run directory, launch.

Hydra composes exactly once, here. Ranks never re-compose: they read the frozen, resolved
``config.yaml`` from the run directory, so a restarted rank, a requeued job and a resumed run
all see the same config (DESIGN.md).

Every error a user can fix (a bad override, a missing file, a bad row) is reported as one line
naming the problem, with exit code 2 and no traceback.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

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

# Sections whose change makes an existing run directory a different run.
_RUN_IDENTITY = ("model", "quant", "lora", "data", "optim", "trainer", "strategy")


class UsageError(Exception):
    """A user-fixable problem, printed as one line with exit code 2."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _compose_error(exc: Exception) -> str:
    """One line out of Hydra/OmegaConf's multi-line composition errors."""
    from hydra.errors import MissingConfigException

    if isinstance(exc, MissingConfigException):
        lines = str(exc).splitlines()
        what = lines[0].replace("In 'config': ", "").rstrip(".")
        options: list[str] = []
        if any(ln.startswith("Available options") for ln in lines):
            start = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
            for ln in lines[start + 1:]:
                if not ln.startswith("\t"):
                    break
                if not ln.strip().endswith("_schema"):
                    options.append(ln.strip())
        return f"{what}; choose one of: {', '.join(options)}" if options else what
    msg = _first_line(exc)
    cause = exc.__cause__
    while cause is not None:
        detail = _first_line(cause)
        if detail and detail not in msg:
            msg = f"{msg.rstrip('.')}: {detail}"
        cause = cause.__cause__
    return msg.replace("\n", " ")


def compose(overrides: Sequence[str]):
    """Compose conf/config.yaml with ``overrides``; returns the DictConfig (unresolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from orchestrator.config import CONF_DIR, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except Exception as exc:  # Hydra raises several unrelated types for bad overrides
        raise UsageError(_compose_error(exc)) from exc


def build_config(overrides: Sequence[str]):
    """Composed, resolved and validated RunConfig."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from orchestrator.config import ConfigError, from_container

    composed = compose(overrides)
    try:
        container = OmegaConf.to_container(composed, resolve=True)
        return from_container(container)
    except (ConfigError, OmegaConfBaseException) as exc:
        raise UsageError(_compose_error(exc)) from exc


def preflight(cfg) -> None:
    """Refuse, before any rank starts, what would only fail inside the ranks."""
    model_dir = Path(cfg.model.path)
    if not model_dir.exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UsageError(f"model.path={cfg.model.path!r}: no such directory (offline: hub ids cannot be fetched)")
    if model_dir.exists() and not (model_dir / "config.json").exists():
        raise UsageError(f"model.path={cfg.model.path!r}: no config.json there; is it a transformers model directory?")
    if model_dir.exists() and not _has_weights(model_dir):
        raise UsageError(
            f"model.path={cfg.model.path!r} holds a config.json but no weights (*.safetensors or "
            "*.bin): `orchestrate plan` works with it, training needs the model itself; set "
            "model.path=/path/to/the/downloaded/model"
        )
    _check_world(cfg)
    if model_dir.exists():
        _check_tokenizer(cfg, model_dir)
    missing = _missing_packages(cfg.strategy.name)
    if missing:
        raise UsageError(
            f"strategy={cfg.strategy.name} needs {missing}, which is not installed "
            f"(pip install -e '.[{missing}]')"
        )
    _prepare_data(cfg)


def _prepare_data(cfg) -> None:
    """Read, check and tokenize the data once, here, into the cache every rank then reads.
    Without a local tokenizer (a hub id) only the rows are checked; rank 0 tokenizes."""
    from orchestrator.data import DataError, check_rows, describe, prepare

    tok_dir = Path(cfg.model.tokenizer or cfg.model.path)
    try:
        if not tok_dir.exists():
            for key in ("path", "eval_path"):
                if getattr(cfg.data, key):
                    try:
                        check_rows(getattr(cfg.data, key), cfg.data)
                    except DataError as exc:
                        raise DataError(f"data.{key}: {exc}") from None
            return
        from orchestrator.model import load_tokenizer

        splits = prepare(cfg.data, load_tokenizer(cfg.model))
    except DataError as exc:
        raise UsageError(str(exc)) from exc
    # A dry run's stdout is the job script alone.
    out = sys.stderr if getattr(cfg.launcher, "dry_run", False) else sys.stdout
    for line in describe(splits):
        print(f"{line} (tokenized cache {'hit' if splits.cache_hit else 'written'}: "
              f"{splits.fingerprint})", file=out, flush=True)


def _has_weights(model_dir: Path) -> bool:
    return any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.bin")) or any(
        model_dir.glob("*.safetensors.index.json"))


def world_size(cfg) -> int:
    """Ranks the launcher will start (known before launch, so batch sizes can be checked)."""
    launcher = cfg.launcher
    if launcher.name == "slurm":
        from launch.slurm import ranks_per_node

        return launcher.nodes * ranks_per_node(launcher)
    from launch.local import default_nproc

    return launcher.nproc_per_node or default_nproc()


def _check_world(cfg) -> None:
    from orchestrator.config import ConfigError, accumulation_steps

    try:
        accumulation_steps(cfg, world_size(cfg))
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc


def _check_tokenizer(cfg, model_dir: Path) -> None:
    """A tokenizer whose ids overflow the model's embedding table would fail mid-run."""
    import json

    vocab = json.loads((model_dir / "config.json").read_text()).get("vocab_size")
    tok_dir = Path(cfg.model.tokenizer or cfg.model.path)
    tok_file = tok_dir / "tokenizer.json"
    if vocab is None or not tok_file.exists():
        return
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(tok_file)).get_vocab_size(with_added_tokens=True)
    if size > vocab:
        raise UsageError(
            f"model.tokenizer={str(tok_dir)!r} has {size} tokens but the model at "
            f"model.path={cfg.model.path!r} embeds only {vocab}; they do not belong together"
        )


def _missing_packages(strategy: str) -> Optional[str]:
    import importlib.util

    needs = {"deepspeed": "deepspeed"}.get(strategy)
    if needs and importlib.util.find_spec(needs) is None:
        return needs
    return None


def default_run_dir(cfg) -> Path:
    name = cfg.run.name or f"{Path(cfg.model.path).name}-{cfg.strategy.name}"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.run.root) / f"{name}-{stamp}"


def prepare_run_dir(cfg, overrides: Sequence[str]) -> Path:
    """Create (or re-enter) the run directory and freeze the resolved config in it."""
    import yaml

    from orchestrator.config import to_container
    from orchestrator.preempt import STOP_FILE

    run_dir = Path(cfg.run.dir) if cfg.run.dir else default_run_dir(cfg)
    run_dir = run_dir.resolve()
    cfg.run.dir = str(run_dir)
    frozen = run_dir / "config.yaml"
    new = to_container(cfg)
    if frozen.exists():
        if not cfg.run.resume:
            raise UsageError(
                f"run.dir={run_dir} already holds a run and run.resume=false; "
                "choose another run.dir or pass run.resume=true to continue it"
            )
        old = yaml.safe_load(frozen.read_text()) or {}
        changed = [k for k in _RUN_IDENTITY if old.get(k) != new.get(k)]
        if changed:
            raise UsageError(
                f"run.dir={run_dir} belongs to a run with a different config ({', '.join(changed)} "
                "differ); resume it with the same overrides or choose another run.dir"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stale stop request must not end this run
    frozen.write_text(yaml.safe_dump(new, sort_keys=False))
    (run_dir / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    return run_dir


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

    print(f"run directory: {run_dir}", flush=True)
    rc = launch(cfg, run_dir)
    if rc == 0 and (run_dir / "summary.json").exists():
        print(f"outputs: {run_dir}/adapter (PEFT adapter), {run_dir}/summary.json, "
              f"{run_dir}/metrics.jsonl, {run_dir}/checkpoints", flush=True)
        print((run_dir / "summary.json").read_text(), end="")
    elif rc == 0:
        print(f"stopped at a checkpoint; continue with: orchestrate train run.dir={run_dir}", flush=True)
    else:
        print(f"training failed (exit code {rc}); the run directory {run_dir} can be resumed with "
              f"orchestrate train run.dir={run_dir}", file=sys.stderr, flush=True)
    return rc


def cmd_plan(args: list[str]) -> int:
    """Exit 0 when the run fits plan.gpu_memory_gb, 1 when it does not."""
    bad = [a for a in args if a.startswith("-")]
    if bad:
        raise UsageError(f"unknown option {bad[0]!r}; overrides are KEY=VALUE (see orchestrate --help)")
    from orchestrator.plan import PlanError, report

    cfg = build_config(args)
    _check_world(cfg)
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
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
