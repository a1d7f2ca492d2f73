"""What a sweep tries: command-line overrides expanded into trials.

Grid sweeps use Hydra's own override grammar and its basic sweeper's expansion
(``BasicSweeper.split_arguments``), so ``-m optim.lr=1e-4,3e-4 'lora.r=range(4,17,4)'`` means
here exactly what it means to any Hydra app. Optuna sweeps keep hydra-optuna-sweeper's search
space format (``interval``, ``tag(log, interval)``, ``range``, ``choice``, comma lists) but turn
it into distributions of the installed Optuna: the plugin itself pins Optuna < 3, whose
distribution classes newer Optuna versions removed.
"""

from __future__ import annotations

from typing import Any, Sequence


class SweepSpaceError(ValueError):
    """A sweep override that cannot be expanded; the message names it."""


def parse(overrides: Sequence[str]) -> list:
    """Hydra ``Override`` objects for the command line (sweep syntax included)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as exc:
        raise SweepSpaceError(str(exc).strip().splitlines()[0]) from exc


def split(overrides: Sequence[str]) -> tuple[list[str], list]:
    """(plain overrides as given, parsed sweep overrides)."""
    parsed = parse(overrides)
    plain = [text for text, o in zip(overrides, parsed) if not o.is_sweep_override()]
    return plain, [o for o in parsed if o.is_sweep_override()]


def swept_values(overrides: Sequence[str], keys: Sequence[str]) -> dict[str, Any]:
    """Typed values of the swept ``keys`` among one trial's overrides (what the report plots)."""
    out = {}
    for override in parse(overrides):
        key = override.get_key_element()
        if key in keys:
            value = override.value()
            plain = isinstance(value, (str, int, float, bool, type(None)))
            out[key] = value if plain else override.get_value_element_as_str()
    return out


def grid(overrides: Sequence[str]) -> tuple[list[list[str]], list[str]]:
    """(one override list per trial, the swept keys), expanded as Hydra's basic sweeper does."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = parse(overrides)
    for override in parsed:
        if override.is_interval_sweep():
            raise SweepSpaceError(
                f"{override.input_line}: interval() is continuous and has no grid; give values "
                "(a,b,c), range() or choice(), or sample it with sweep=optuna")
    keys = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    (batch,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return batch, keys


def optuna_space(params: dict[str, str], plain: Sequence[str], sweeps: Sequence) -> tuple[dict[str, Any], list[str]]:
    """(Optuna distributions per key, fixed overrides). The preset's ``params`` come first
    (a plain value there is fixed for every trial, as in the plugin), less the keys that a
    plain command-line override fixes; then the command line's sweep overrides."""
    given = {o.get_key_element() for o in parse(plain)}
    space, fixed = {}, []
    for override in parse([f"{key}={value}" for key, value in params.items()]):
        if override.get_key_element() in given:
            continue
        if override.is_sweep_override():
            space[override.get_key_element()] = _distribution(override)
        else:
            fixed.append(override.input_line)
    for override in sweeps:
        space[override.get_key_element()] = _distribution(override)
    if not space:
        raise SweepSpaceError(
            "sweep=optuna has no search space: set sweep.params in the preset or add sweep "
            "overrides such as 'optim.lr=tag(log,interval(1e-4,1e-2))'")
    return space, fixed


def _distribution(override) -> Any:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep):
        choices = list(value.list)
        if not all(isinstance(c, (str, int, float, bool, type(None))) for c in choices):
            raise SweepSpaceError(f"{override.input_line}: Optuna choices must be numbers, strings or booleans")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        # Hydra's range() excludes its stop, Optuna's high is inclusive: the last value in range.
        last = value.start + ((value.stop - value.start - 1e-12) // value.step) * value.step
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(value.start, int(last), step=value.step)
        return FloatDistribution(float(value.start), float(last), step=float(value.step))
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        return FloatDistribution(float(value.start), float(value.end), log=log)
    raise SweepSpaceError(f"{key}: {override.input_line!r} is not a search space Optuna can sample")


def trial_overrides(plain: Sequence[str], params: dict[str, Any]) -> list[str]:
    """Overrides of one sampled trial: the plain ones, then ``KEY=VALUE`` per sampled value."""
    from hydra.core.override_parser.types import Override

    return [*plain, *(f"{k}={Override._get_value_element_as_str(v)}" for k, v in params.items())]
