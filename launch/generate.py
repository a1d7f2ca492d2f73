"""``orchestrate generate``: try a trained run on prompts, one-shot, from a file, or interactively.

    orchestrate generate run_dir=R prompt="Reverse the word." [input=planet]
    orchestrate generate run_dir=R file=prompts.jsonl      # rows in the run's data format
    orchestrate generate run_dir=R                           # interactive; chat keeps the history

The model is the run's base in 4-bit with its adapter, as in training (``merged=DIR`` or
``merged=true`` for ``R/merged`` uses a merged export instead); prompts are formatted by the run's
own data path (orchestrator/generate.py says why).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, TextIO

from launch.prepare import UsageError

KEYS = ("run_dir", "prompt", "input", "file", "merged", "max_new_tokens", "temperature", "top_p",
        "top_k", "seed", "batch_size")
USAGE = ("generate run_dir=PATH [prompt=TEXT [input=TEXT] | file=PROMPTS.jsonl] [merged=true|DIR] "
         "[max_new_tokens=N] [temperature=T] [top_p=P] [top_k=K] [seed=S] [batch_size=B]")


def _options(args: list[str]) -> dict[str, str]:
    bad = [a for a in args if "=" not in a]
    opts = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = bad + [k for k in opts if k not in KEYS]
    if unknown:
        raise UsageError(f"generate: unknown argument {unknown[0]!r}; usage: orchestrate {USAGE}")
    if "run_dir" not in opts:
        raise UsageError(f"generate: run_dir=PATH is required; usage: orchestrate {USAGE}")
    if "prompt" in opts and "file" in opts:
        raise UsageError("generate: give prompt=... or file=..., not both")
    return opts


def _sampling(opts: dict[str, str]):
    from orchestrator.generate import GenerateError, Sampling

    kinds = {"max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int}
    values = {}
    for key, kind in kinds.items():
        if key in opts:
            try:
                values[key] = kind(opts[key])
            except ValueError:
                raise UsageError(f"generate: {key}={opts[key]!r} is not a{'n integer' if kind is int else ' number'}") from None
    sampling = Sampling(**values)
    try:
        sampling.check()
    except GenerateError as exc:
        raise UsageError(f"generate: {exc}") from None
    return sampling


def _read_prompts(path: Path) -> list[dict]:
    if not path.is_file():
        raise UsageError(f"generate: file={path}: no such file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"generate: {path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UsageError(f"generate: {path}:{n}: a row must be an object in the run's data format")
        rows.append(row)
    if not rows:
        raise UsageError(f"generate: {path} holds no prompts")
    return rows


def _interactive(chat, sampling, stdin: TextIO, stdout: TextIO) -> None:
    """One prompt per line (alpaca: the instruction, a tab, then the input if any); chat runs keep
    the conversation (/reset clears it). EOF or /quit ends."""
    history: list[dict] = []
    chat_format = chat.data_cfg.format == "chat"
    hint = " (instruction<TAB>input)" if chat.data_cfg.format == "alpaca" else ""
    print(f"{chat.data_cfg.format} format; one prompt per line{hint}"
          f"{', /reset clears the history' if chat_format else ''}, /quit or Ctrl-D ends", file=stdout)
    while True:
        print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            print(file=stdout)
            return
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if chat_format and text.strip() == "/reset":
            history = []
            continue
        instruction, _, input_text = text.partition("\t")  # alpaca: instruction<TAB>input
        answer = chat.complete(chat.row(instruction if not chat_format else text, input_text,
                                        history), sampling)
        print(answer, file=stdout, flush=True)
        if chat_format:
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def cmd_generate(args: list[str], stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None) -> int:
    opts = _options(args)
    sampling = _sampling(opts)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    run_dir = Path(opts["run_dir"]).resolve()
    merged: Optional[Path] = None
    if "merged" in opts and opts["merged"].lower() not in ("false", "no", "0"):
        merged = run_dir / "merged" if opts["merged"].lower() in ("true", "yes", "1") else Path(opts["merged"])
    rows = _read_prompts(Path(opts["file"])) if "file" in opts else None
    _quiet_libraries()
    from orchestrator.generate import Chat, GenerateError

    try:
        chat = Chat(run_dir, merged)
        if rows is not None:
            outputs = chat.complete_many(rows, sampling, int(opts.get("batch_size", 8)))
            for row, out in zip(rows, outputs):
                print(json.dumps({**row, "completion": out}, ensure_ascii=False), file=stdout)
        elif "prompt" in opts:
            print(chat.complete(chat.row(opts["prompt"], opts.get("input", "")), sampling), file=stdout)
        else:
            _interactive(chat, sampling, stdin, stdout)
    except GenerateError as exc:
        raise UsageError(f"generate: {exc}") from None
    return 0


def _quiet_libraries() -> None:
    """Loading bars and deprecation notes from transformers would bury the answer."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
