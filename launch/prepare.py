"""The steps every command shares before anything launches: compose the config once, validate
it, preflight what would only fail inside the ranks, and make (or re-enter) the run directory.

``cli`` (a single run) and ``sweep`` (every trial) both go through these functions, so a trial is
refused for exactly the reasons a run is; nothing here imports either of them.

Every error a user can fix is raised as ``UsageError``: one line, exit code 2, no traceback.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from launch.errors import UsageError, first_line as _first_line  # noqa: F401 (UsageError: re-exported)

# Sections whose change makes an existing run directory a different run.
_RUN_IDENTITY = ("model", "quant", "lora", "data", "optim", "trainer", "strategy")


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
        cfg = from_container(container)
    except (ConfigError, OmegaConfBaseException) as exc:
        raise UsageError(_compose_error(exc)) from exc
    if cfg.launcher.name == "slurm":  # a template name becomes the file it names, frozen
        from launch.config_dirs import search_dirs
        from launch.slurm import SlurmError, resolve_template

        try:
            cfg.launcher.template = str(resolve_template(cfg.launcher.template, search_dirs(overrides)))
        except SlurmError as exc:
            raise UsageError(str(exc)) from exc
    return cfg


def preflight(cfg) -> None:
    """Refuse, before any rank starts, what would only fail inside the ranks."""
    _check_run_dir(cfg)
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
    check_world(cfg)
    _check_offload(cfg)
    _check_wandb(cfg)
    from launch.fork import check_fork

    check_fork(cfg)  # before the family check: the parent's LoRA shape becomes the run's
    if model_dir.exists():
        _check_tokenizer(cfg, model_dir)
        from launch.model_checks import check_family

        check_family(cfg)
    check_packages(cfg)
    _report(_check_disk(cfg), cfg)  # before data preparation, which may take long
    data = _data_lengths(cfg, _prepare_data(cfg))
    _resolve_auto(cfg, data)
    _report(_check_memory(cfg, data), cfg)  # after auto, at the data's real lengths


def _data_lengths(cfg, splits):
    """The prepared data's lengths, once, for both auto and the memory check (plan/lengths.py)."""
    from launch.auto import prepared_lengths
    from orchestrator.data import DataError

    try:
        return prepared_lengths(cfg, splits)
    except DataError as exc:
        raise UsageError(str(exc)) from exc


def _resolve_auto(cfg, data) -> None:
    """``auto`` settings become concrete here, at the prepared data's lengths, before
    prepare_run_dir freezes the config (launch/auto.py)."""
    from launch.auto import has_auto, resolve
    from launch.budget import BudgetError, memory_budget
    from orchestrator.plan import PlanError

    try:
        budget = memory_budget(cfg, ranks_per_node(cfg)) if has_auto(cfg) else None
        line = resolve(cfg, world_size(cfg), ranks_per_node(cfg), data, budget)
    except (PlanError, BudgetError) as exc:
        raise UsageError(str(exc)) from exc
    if line:
        print(line, file=sys.stderr if getattr(cfg.launcher, "dry_run", False) else sys.stdout, flush=True)
        check_world(cfg)


def _check_offload(cfg) -> None:
    """FSDP's CPU offload moves parameters from the GPUs to the host; ranks on the CPU have
    nowhere to offload from (FSDP2 then fails inside the ranks, asking for an accelerator)."""
    from launch.auto import rank_device

    if getattr(cfg.strategy, "cpu_offload", False) and rank_device(cfg) == "cpu":
        raise UsageError("strategy.cpu_offload=true offloads from GPUs to the host; these ranks run "
                         "on the CPU already: leave it false")


def _check_wandb(cfg) -> None:
    """``logger.wandb.mode=online`` with no reachable server would only fall back to offline
    inside the ranks; the user asked for online, so say it here, in a few seconds."""
    from orchestrator.wandb_sink import preflight_problem

    problem = preflight_problem(cfg.logger.wandb)
    if problem:
        raise UsageError(problem)


def _check_run_dir(cfg) -> None:
    from launch.budget import BudgetError
    from launch.diskspace import check_run_dir

    try:
        check_run_dir(cfg)
    except BudgetError as exc:
        raise UsageError(str(exc)) from exc


def _check_disk(cfg) -> list[str]:
    """Room for two checkpoints and the adapter on the run directory's filesystem."""
    from launch.budget import BudgetError
    from launch.diskspace import check_space

    try:
        return check_space(cfg, world_size(cfg))
    except BudgetError as exc:
        raise UsageError(str(exc)) from exc


def _check_memory(cfg, data) -> list[str]:
    """The memory plan against what the ranks will have."""
    from launch.budget import BudgetError, check_memory

    try:
        return check_memory(cfg, world_size(cfg), ranks_per_node(cfg), data)
    except BudgetError as exc:
        raise UsageError(str(exc)) from exc


def _report(lines: list[str], cfg) -> None:
    for line in lines:  # warnings to stderr; a dry run's stdout is the job script alone
        quiet = line.startswith("warning") or getattr(cfg.launcher, "dry_run", False)
        print(line, file=sys.stderr if quiet else sys.stdout, flush=True)


def _prepare_data(cfg):
    """Read, check and tokenize the data once, here, into the cache every rank then reads.
    Without a local tokenizer (a hub id) only the rows are checked; rank 0 tokenizes."""
    from orchestrator.data import DataError, check_data, describe, prepare

    tok_dir = Path(cfg.model.tokenizer or cfg.model.path)
    try:
        if not tok_dir.exists():
            check_data(cfg.data)
            return None
        from orchestrator.model import load_tokenizer

        splits = prepare(cfg.data, load_tokenizer(cfg.model))
    except DataError as exc:
        raise UsageError(str(exc)) from exc
    # A dry run's stdout is the job script alone.
    out = sys.stderr if getattr(cfg.launcher, "dry_run", False) else sys.stdout
    for line in describe(splits):
        print(f"{line} (tokenized cache {'hit' if splits.cache_hit else 'written'}: "
              f"{splits.fingerprint})", file=out, flush=True)
    return splits


def _has_weights(model_dir: Path) -> bool:
    return any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.bin")) or any(
        model_dir.glob("*.safetensors.index.json"))


def world_size(cfg) -> int:
    """Ranks the launcher will start (known before launch, so batch sizes can be checked)."""
    launcher = cfg.launcher
    return ranks_per_node(cfg) * (launcher.nodes if launcher.name == "slurm" else 1)


def ranks_per_node(cfg) -> int:
    launcher = cfg.launcher
    if launcher.name == "slurm":
        from launch.slurm import ranks_per_node as slurm_ranks

        return slurm_ranks(launcher)
    from launch.local import default_nproc

    return launcher.nproc_per_node or default_nproc()


def check_world(cfg) -> None:
    from orchestrator.config import ConfigError, accumulation_steps, is_auto

    world = world_size(cfg)
    if is_auto(cfg.trainer.micro_batch_size):  # auto picks a divisor of the per-rank batch
        if cfg.trainer.global_batch_size % world:
            raise UsageError(f"trainer.global_batch_size={cfg.trainer.global_batch_size} is not "
                             f"divisible by the world size {world}")
        return
    try:
        accumulation_steps(cfg, world)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    layout(cfg)


def layout(cfg) -> Optional[str]:
    """How FSDP lays the ranks out (printed before launch); None for other strategies."""
    if cfg.strategy.name != "fsdp":
        return None
    from orchestrator.strategies.mesh import MeshError, describe

    try:
        return describe(cfg.strategy.replicate, world_size(cfg), ranks_per_node(cfg))
    except MeshError as exc:
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


def check_packages(cfg) -> None:
    """A strategy whose package is not installed, refused before any rank imports it."""
    import importlib.util

    needs = {"deepspeed": "deepspeed"}.get(cfg.strategy.name)
    if needs and importlib.util.find_spec(needs) is None:
        raise UsageError(f"strategy={cfg.strategy.name} needs {needs}, which is not installed "
                         f"(pip install -e '.[{needs}]')")
    if cfg.launcher.cpu_allocator == "mimalloc":
        from orchestrator.hostalloc import AllocatorError, for_ranks

        try:
            for_ranks("mimalloc", cuda=False)
        except AllocatorError as exc:
            raise UsageError(str(exc)) from None


def default_run_dir(cfg) -> Path:
    name = cfg.run.name or f"{Path(cfg.model.path).name}-{cfg.strategy.name}"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.run.root) / f"{name}-{stamp}"


def prepare_run_dir(cfg, overrides: Sequence[str]) -> Path:
    """Create (or re-enter) the run directory and freeze the resolved config in it."""
    import yaml

    from orchestrator import rundir
    from orchestrator.config import to_container
    from orchestrator.preempt import STOP_FILE

    run_dir = Path(cfg.run.dir) if cfg.run.dir else default_run_dir(cfg)
    run_dir = run_dir.resolve()
    cfg.run.dir = str(run_dir)
    _lock(run_dir)  # one writer per run directory: refuse before touching anything in it
    frozen = run_dir / "config.yaml"
    new = to_container(cfg)
    if frozen.exists():
        if not cfg.run.resume:
            rundir.let_go(run_dir)
            raise UsageError(
                f"run.dir={run_dir} already holds a run and run.resume=false; "
                "choose another run.dir or pass run.resume=true to continue it"
            )
        old = yaml.safe_load(frozen.read_text()) or {}
        changed = [k for k in _RUN_IDENTITY if old.get(k) != new.get(k)]
        extension = _extension(old.get("trainer") or {}, new["trainer"]) if changed == ["trainer"] else None
        if extension:
            print(extension, file=sys.stderr if getattr(cfg.launcher, "dry_run", False) else sys.stdout,
                  flush=True)
        elif changed:
            rundir.let_go(run_dir)
            raise UsageError(
                f"run.dir={run_dir} belongs to a run with a different config ({', '.join(changed)} "
                "differ); resume it with the same overrides or choose another run.dir"
            )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stale stop request must not end this run
        frozen.write_text(yaml.safe_dump(new, sort_keys=False))
        (run_dir / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
        rundir.reserve_space(run_dir)  # for the state that says a full disk ended the run
    except OSError as exc:  # what check_run_dir's probe could not foresee (a race, a quota)
        raise UsageError(f"run.dir={str(run_dir)!r} cannot be written: {exc.strerror or exc} "
                         f"({exc.filename or run_dir})") from exc
    return run_dir


#: Settings that may grow on an existing run: the run is extended, everything else must match.
EXTENDABLE = ("max_steps", "epochs")


def _extension(old: dict, new: dict) -> Optional[str]:
    """The line announcing an extension when ``new`` only raises the run's length over ``old``
    (trainer.max_steps, or trainer.epochs when steps come from epochs); None otherwise.

    The rule, decided once: the checkpoint resumes as any resume does (adapter, optimizer,
    sampler position, RNG), and the learning-rate schedule is the one of the new total,
    continued from the resumed step; the steps already taken keep the rates they had. Under a
    constant schedule the extended run equals a run trained to the new total in one go; under
    cosine or linear decay the rate at the resumed step rises to where the longer schedule has
    it (a restart of the decay, not of warmup)."""
    if {k for k in set(old) | set(new) if old.get(k) != new.get(k)} - set(EXTENDABLE):
        return None
    if new.get("max_steps", 0) > 0 and old.get("max_steps", 0) > 0:
        if new["max_steps"] <= old["max_steps"]:
            return None
        what = f"trainer.max_steps {old['max_steps']} -> {new['max_steps']}"
    elif new.get("max_steps", 0) <= 0 and old.get("max_steps", 0) <= 0 and new.get("epochs", 0) > old.get("epochs", 0):
        what = f"trainer.epochs {old.get('epochs')} -> {new['epochs']}"
    else:
        return None
    return (f"extending the run: {what}; it resumes from its latest checkpoint and the "
            "learning-rate schedule is the new total's, continued from there")


def _lock(run_dir: Path) -> None:
    """Hold ``run_dir`` for this launch (released when the launcher exits, or handed to the
    Slurm job it submits); a directory another run writes is refused with its holder named."""
    from orchestrator import rundir

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.hold(run_dir)
    except rundir.RunDirBusy as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:  # the disk filled (or went read-only) since the preflight's probe
        raise UsageError(f"run.dir={str(run_dir)!r} cannot be written: {exc.strerror or exc} "
                         f"({exc.filename or run_dir / rundir.LOCK_FILE})") from None
