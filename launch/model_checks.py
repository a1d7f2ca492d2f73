"""What the model's family and a starting adapter allow, checked before any rank loads weights.

Both work on a meta-device model built from ``config.json`` (orchestrator/families.py): no
memory and seconds for any size, so a 70B base is checked as fast as the tiny one.
"""

from __future__ import annotations

from pathlib import Path

from launch.errors import UsageError, first_line as _first_line


def check_family(cfg) -> None:
    """What the model's family cannot do with this config, refused before any rank loads
    weights (orchestrator/families.py): an attention implementation the family refuses, FSDP on
    a model that declares no blocks, 4 bits asked where most weights would stay 16-bit. Built
    on the meta device from config.json: no memory, seconds for any size."""
    from orchestrator.families import check_coverage, coverage, decoder_blocks, meta_model

    where = f"model.path={cfg.model.path!r}"
    try:
        meta = meta_model(cfg.model.path, cfg.model.attn_implementation, cfg.model.trust_remote_code)
    except (ValueError, ImportError, OSError, KeyError) as exc:
        what = (f"model.attn_implementation={cfg.model.attn_implementation!r}"
                if cfg.model.attn_implementation else where)
        raise UsageError(f"{what}: {_first_line(exc)}") from exc
    _adopt_adapter(cfg, meta)
    try:
        if cfg.quant.method != "none":
            check_coverage(coverage(meta), cfg.quant.method, cfg.quant.allow_unquantized,
                           type(meta).__name__)
        if cfg.strategy.name == "fsdp":
            decoder_blocks(meta)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}" if "FSDP" in str(exc) else str(exc)) from exc


def adopt_lora_shape(cfg, shape: dict, theirs: str) -> None:
    """Make ``shape`` (lora.* keys -> values of a starting adapter) the run's LoRA shape: a key
    left at its default takes the value, one the user set otherwise is refused in one line
    (``theirs`` formats the value's origin, e.g. "the adapter's {} at ...")."""
    from orchestrator.config import LoraConfig

    default = LoraConfig()
    for key, value in shape.items():
        mine = getattr(cfg.lora, key)
        mine = list(mine) if isinstance(mine, (list, tuple)) else mine
        if mine != value:
            if mine != getattr(default, key):
                raise UsageError(f"lora.{key}={mine} contradicts {theirs.format(value)}; leave it unset: "
                                 "the starting adapter's LoRA shape is the run's")
            setattr(cfg.lora, key, value)


def _adopt_adapter(cfg, meta) -> None:
    """``lora.init_from``: the adapter's LoRA shape (r, alpha, rsLoRA, target modules) becomes
    the run's, frozen into config.yaml; a different value set by the user, or an adapter whose
    layers this model does not have (another base), is refused here rather than by a shape
    error on every rank after loading."""
    import json

    path = cfg.lora.init_from
    if not path:
        return
    where = f"lora.init_from={path}"
    conf_file = Path(path) / "adapter_config.json"
    if not conf_file.is_file():
        raise UsageError(f"{where}: no adapter_config.json there; a PEFT adapter directory (a run's "
                         "adapter/) is expected")
    theirs = json.loads(conf_file.read_text())
    if theirs.get("peft_type") != "LORA":
        raise UsageError(f"{where}: a {theirs.get('peft_type')} adapter; only LoRA adapters can start a run")
    targets = theirs.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    adopt_lora_shape(cfg, {"r": theirs.get("r"), "alpha": theirs.get("lora_alpha"),
                           "use_rslora": bool(theirs.get("use_rslora", False)), "target_modules": targets},
                     f"the adapter's {{}} at {where}")
    from safetensors import safe_open

    weights = Path(path) / "adapter_model.safetensors"
    if not weights.is_file():
        raise UsageError(f"{where}: no adapter_model.safetensors there")
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module_path = key.split(".lora_")[0].removeprefix("base_model.model.")
            try:
                module = meta.get_submodule(module_path)
            except AttributeError:
                raise UsageError(f"{where}: the adapter adapts {module_path}, which {type(meta).__name__} "
                                 f"at model.path={cfg.model.path!r} does not have; was it trained for "
                                 "another base?") from None
            shape = f.get_slice(key).get_shape()
            w = getattr(module, "weight", None)
            if w is None or w.dim() != 2:
                continue
            out_f, in_f = (w.shape[1], w.shape[0]) if type(module).__name__ == "Conv1D" else tuple(w.shape)
            expect = in_f if ".lora_A." in key else out_f
            got = shape[1] if ".lora_A." in key else shape[0]
            if got != expect:
                raise UsageError(f"{where}: {key} fits a layer of {got} features, {module_path} here has "
                                 f"{expect}; was it trained for another base?")
