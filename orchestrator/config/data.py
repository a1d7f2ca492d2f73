"""The data section of the run configuration (data.*): what is read, how rows are formatted
and cut, and a mixture of several sources, with the checks types cannot express."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError

@dataclass
class DataConfig:
    # alpaca: instruction / optional input / output fields; chat: a list of {role, content}
    # messages rendered with the tokenizer's chat template; text: raw text (continued pretraining);
    # prompt_completion: TRL's prompt/completion rows, plain or conversational.
    format: str = "alpaca"
    # A local .jsonl, .json, .parquet or .csv file, or a directory of such shards; a directory
    # written by datasets' save_to_disk; or, where no such local path exists, a Hugging Face
    # dataset's repository id (org/name), read through datasets.load_dataset so that HF_HOME's
    # cache, HF_HUB_OFFLINE and the user's login apply as everywhere else.
    path: Optional[str] = None
    # For a Hugging Face dataset: its config (subset) name, the split to train on, the revision
    # (branch, tag or commit) and data_files (files of the repository to read).
    config_name: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    data_files: Optional[list[str]] = None
    # Eval split from its own file or dataset (eval_split names that dataset's split, else
    # data.split); or eval_split alone: another split of data.path's dataset; or hold out
    # eval_fraction of the training rows instead.
    eval_path: Optional[str] = None
    eval_split: Optional[str] = None
    eval_fraction: float = 0.0
    # Seed of the held-out split (fixed apart from the trainer seed, so it never moves).
    split_seed: int = 0
    max_seq_len: int = 512
    # Examples longer than max_seq_len: right (keep the start; chat keeps whole turns first),
    # left (keep the end, the response), drop (skip them), error (stop at the first one). Under
    # right and left an example left with no trained token is dropped; counts are reported.
    truncation: str = "right"
    # Compute the loss on prompt tokens as well as on the response.
    train_on_prompt: bool = False
    # Pack several examples into each row (position ids restart per example, no attention
    # across examples) instead of padding every example to the longest in the micro-batch.
    packing: bool = False
    # What packing packs: step (each step's global batch of trainer.global_batch_size examples,
    # the same examples and loss as unpacked) or dataset (the whole set once, as TRL and
    # torchtune do; trainer.global_batch_size then counts rows of max_seq_len, ~98% full).
    packing_scope: str = "step"
    # A malformed row stops the run (error) or is skipped and counted (skip).
    on_bad_row: str = "error"
    # Tokenized data cache, keyed by data, tokenizer and settings; null:
    # $QLORA_ORCHESTRATOR_CACHE or ~/.cache/qlora-orchestrator/data.
    cache_dir: Optional[str] = None
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    prompt_template: str = (
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    )
    # Template for rows whose input field is empty or absent.
    prompt_template_no_input: str = "### Instruction:\n{instruction}\n\n### Response:\n"
    # The field holding a conversation; when a row lacks the default "messages" its
    # "conversations" is read (ShareGPT's field).
    messages_field: str = "messages"
    # Keys of a message's role and text: null reads role/content, or from/value in a message that
    # has those instead (ShareGPT). Role names are mapped onto the template's: ShareGPT's human,
    # gpt, observation and function are known; role_map adds to or overrides them.
    role_field: Optional[str] = None
    content_field: Optional[str] = None
    role_map: dict[str, str] = field(default_factory=dict)
    # Jinja chat template (inline, or a path to a .jinja file) for tokenizers without one.
    chat_template: Optional[str] = None
    text_field: str = "text"
    # Which turns of a conversation are trained (chat, conversational prompt_completion): their
    # content and end-of-turn marker. Axolotl's roles_to_train; e.g. [assistant, tool].
    roles_to_train: list[str] = field(default_factory=lambda: ["assistant"])
    # The field with the functions a conversation may call (a list of JSON schemas, or that list
    # as a JSON string), given to the chat template as `tools`; assistant turns with tool_calls
    # (content may be null) and tool results are rendered as the template writes them.
    tools_field: str = "tools"
    # prompt_completion (TRL's): two strings, or two lists of messages; the loss is on the completion.
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    # Worker processes that tokenize (null: the cores of the machine that prepares the data).
    num_proc: Optional[int] = None
    # A mixture instead of data.path: a list of sources, each a mapping of data.* settings for
    # that source (path and its dataset settings, format, field names, eval_fraction/eval_path/
    # eval_split...; what it leaves out it takes from data.*) plus a `weight` (its share of the
    # mixture) or `rows` (an exact count; more than the source has repeats it). See
    # orchestrator/data/mixture.py for how counts are drawn.
    sources: list[dict[str, Any]] = field(default_factory=list)
    # With weights: the mixture's size in examples (null: the largest that draws no source's
    # example twice).
    mixture_rows: Optional[int] = None



DATA_CHOICES: dict[str, tuple[str, ...]] = {
    "format": ("alpaca", "chat", "text", "prompt_completion"),
    "truncation": ("right", "left", "drop", "error"),
    "on_bad_row": ("error", "skip"),
    "packing_scope": ("step", "dataset"),
}
#: What a mixture source sets beyond data.*'s keys.
SOURCE_KEYS = ("weight", "rows", "name")
#: data.* keys that are the mixture's, not a source's.
MIXTURE_ONLY = ("sources", "mixture_rows", "max_seq_len", "packing", "packing_scope", "cache_dir",
                "num_proc", "split_seed")
#: What a source does not inherit from data.*: where its rows (and its own eval rows) come from.
NOT_INHERITED = ("path", "config_name", "split", "revision", "data_files", "eval_path", "eval_split")


def validate_data(data: DataConfig, key: str = "data") -> None:
    """Checks of data.* (and of each mixture source, as ``data.sources[i]``)."""
    for name, allowed in DATA_CHOICES.items():
        value = getattr(data, name)
        if value not in allowed:
            raise ConfigError(f"{key}.{name}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
    if data.max_seq_len <= 0:
        raise ConfigError(f"{key}.max_seq_len={data.max_seq_len!r} is not allowed; it must be > 0")
    if data.num_proc is not None and data.num_proc <= 0:
        raise ConfigError(f"{key}.num_proc={data.num_proc!r} is not allowed; it must be > 0")
    if not 0.0 <= data.eval_fraction < 1.0:
        raise ConfigError(f"{key}.eval_fraction={data.eval_fraction!r} is not allowed; it must be in [0, 1)")
    named = [f"{key}.{k}={getattr(data, k)!r}" for k in ("eval_path", "eval_split") if getattr(data, k)]
    if data.eval_fraction > 0 and named:
        raise ConfigError(f"{key}.eval_fraction={data.eval_fraction!r} and {named[0]}: "
                          "choose one source for the eval split")
    if data.packing_scope == "dataset" and not data.packing:
        raise ConfigError(f"{key}.packing_scope=dataset needs {key}.packing=true")
    if not data.roles_to_train or not all(isinstance(r, str) and r for r in data.roles_to_train):
        raise ConfigError(f"{key}.roles_to_train={list(data.roles_to_train)!r} is not allowed; name at least "
                          "one role (assistant, user, system, tool)")
    if key == "data":
        _check_mixture(data)


def _check_mixture(data: DataConfig) -> None:
    if not data.sources:
        if data.path is None:
            raise ConfigError("data.path is missing: set data.path (a file, directory or Hugging Face "
                              "dataset) or data.sources (a mixture)")
        if data.mixture_rows is not None:
            raise ConfigError("data.mixture_rows applies to a mixture; set data.sources or leave it null")
        return
    if data.path is not None:
        raise ConfigError(f"data.path={data.path!r} and data.sources: give the rows either as one path "
                          "or as a mixture's sources, not both (for a mixture: data=jsonl, whose path is null)")
    if data.eval_fraction > 0:
        raise ConfigError("data.eval_fraction with data.sources: set eval_fraction on each source that "
                          "should give eval rows, or data.eval_path for an eval set of its own")
    if data.mixture_rows is not None and data.mixture_rows <= 0:
        raise ConfigError(f"data.mixture_rows={data.mixture_rows!r} is not allowed; it must be > 0")
    for i, _ in enumerate(data.sources):
        source_config(data, i)
    kinds = {("rows" if "rows" in s else "weight") for s in data.sources}
    if len(kinds) > 1:
        raise ConfigError("data.sources: give every source a weight, or every source rows, not a mix of both")
    if kinds == {"rows"} and data.mixture_rows is not None:
        raise ConfigError("data.mixture_rows with sources given in rows: the rows already fix the size")


def source_config(data: DataConfig, i: int) -> DataConfig:
    """Source ``i`` of a mixture as a DataConfig of its own: data.* with the source's settings
    over it (where its rows come from is never inherited), checked as ``data.sources[i]``."""
    key = f"data.sources[{i}]"
    spec = data.sources[i]
    if not isinstance(spec, dict):
        raise ConfigError(f"{key} must be a mapping of data settings (path, format, weight...), got "
                          f"{type(spec).__name__}")
    allowed = [f.name for f in dataclasses.fields(DataConfig) if f.name not in MIXTURE_ONLY]
    unknown = [k for k in spec if k not in allowed and k not in SOURCE_KEYS]
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]} is not a source setting; a source takes {', '.join(SOURCE_KEYS)} "
                          f"and these data settings: {', '.join(allowed)}")
    if not isinstance(spec.get("path"), str) or not spec["path"]:
        raise ConfigError(f"{key}.path is missing: each source names its file, directory or dataset")
    if "weight" in spec and "rows" in spec:
        raise ConfigError(f"{key}: give weight or rows, not both")
    weight, rows = spec.get("weight", 1.0), spec.get("rows")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
        raise ConfigError(f"{key}.weight={weight!r} is not allowed; it must be a number > 0")
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0):
        raise ConfigError(f"{key}.rows={rows!r} is not allowed; it must be an integer > 0")
    inherited = {f.name: getattr(data, f.name) for f in dataclasses.fields(DataConfig)
                 if f.name not in NOT_INHERITED}
    own = {k: v for k, v in spec.items() if k not in SOURCE_KEYS}
    try:
        cfg = DataConfig(**{**inherited, **own, "sources": [], "mixture_rows": None})
    except TypeError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    validate_data(cfg, key)
    return cfg


def eval_source_config(data: DataConfig) -> DataConfig:
    """A mixture's data.eval_path as a DataConfig whose training rows are the eval rows
    (data.eval_split, else data.split, of that file or dataset; data.* settings otherwise)."""
    return dataclasses.replace(data, path=data.eval_path, split=data.eval_split or data.split, eval_path=None,
                               eval_split=None, sources=[], mixture_rows=None)
