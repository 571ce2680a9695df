"""Reading and writing configs: TOML files, ``--section.key=value`` overrides, ``--help`` and
the reference page docs/configuration.md. The schema and its validation are gpt/config.py's.

Precedence is defaults < TOML file < command line. A command-line value is read as a TOML
value (https://toml.io/en/v1.0.0). An unknown section or key, or a value of the wrong type,
raises ``ConfigError`` naming the key and listing what is valid. ``to_toml`` writes a config
``load_config`` reads back to an equal one (``python -m gpt.config_io`` prints the reference).
"""

from __future__ import annotations

import dataclasses
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from gpt.config import (
    CHOICES,
    RETIRED_SECTIONS,
    SECTION_TYPES,
    SECTIONS,
    Config,
    ConfigError,
    retired_setting,
)
from gpt.fileio import write_atomic


def _type_name(tp: Any) -> str:
    if isinstance(tp, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp)) if not typing.get_args(tp) else str(tp)


def _matches(value: Any, tp: Any) -> bool:
    if isinstance(tp, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:  # an integer literal is a fine float; a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(tp)
    if origin is dict:
        kt, vt = typing.get_args(tp)
        return isinstance(value, dict) and all(
            _matches(k, kt) and _matches(v, vt) for k, v in value.items()
        )
    if origin is list:
        (et,) = typing.get_args(tp)
        return isinstance(value, list) and all(_matches(v, et) for v in value)
    return isinstance(value, tp)


def _section_fields(section: str) -> dict[str, tuple[Any, str]]:
    cls = SECTION_TYPES[section]
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata.get("help", "")) for f in dataclasses.fields(cls)}


def _set(cfg: Config, section: str, key: str, value: Any, origin: str) -> None:
    if section in RETIRED_SECTIONS:  # an old run's config.toml: read, or refused with a why
        retired_setting(section, key, value, origin)
        return
    if section not in SECTIONS:
        raise ConfigError(f"{origin}: unknown section [{section}]; valid: {', '.join(SECTIONS)}")
    if section == "deepspeed":
        node = cfg.deepspeed
        *parents, leaf = key.split(".")
        for depth, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                where = ".".join(["deepspeed", *parents[: depth + 1]])
                raise ConfigError(
                    f"{origin}: {where} is {node!r}, not a table, so deepspeed.{key} cannot be "
                    f"set; set {where} as a table (--{where}.KEY=VALUE) or leave out one of them"
                )
        node[leaf] = value
        return
    fields = _section_fields(section)
    if key not in fields:
        raise ConfigError(
            f"{origin}: unknown key {section}.{key}; valid keys of [{section}]: {', '.join(fields)}"
        )
    tp = fields[key][0]
    if not _matches(value, tp):
        why = ""
        if isinstance(value, str) and typing.get_origin(tp) in (dict, list):
            try:  # a table or array that is not valid TOML was taken as a string: say why
                tomllib.loads(f"v = {value}")
            except tomllib.TOMLDecodeError as err:
                why = f", which is not a TOML value: {str(err).split(' (at line')[0]}"
        raise ConfigError(
            f"{origin}: {section}.{key} must be {_type_name(tp)}, got {value!r} "
            f"({type(value).__name__}){why}"
        )
    if tp is float or (isinstance(tp, types.UnionType) and float in typing.get_args(tp)):
        value = float(value) if isinstance(value, int) else value
    setattr(getattr(cfg, section), key, value)
    cfg.given.add(f"{section}.{key}")


def _parse_value(text: str) -> Any:
    """A command-line value is read as a TOML value (42, 3e-4, true, "x", [1, 2]); anything
    that is not valid TOML is taken as a bare string, and none/null mean None."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the TOML file at ``path``, then ``--section.key=value`` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); TOML files are UTF-8"
            ) from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot read it ({err.strerror})") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{path}: top-level key {section!r} must be a [section]; valid sections: "
                    f"{', '.join(SECTIONS)}"
                )
            for key, value in table.items():
                _set(cfg, section, key, value, str(path))
    for arg in overrides:
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"command line: expected --section.key=value, got {arg!r}")
        name, sep, text = arg[2:].partition("=")
        if not sep:
            raise ConfigError(f"command line: {arg!r} has no value; write --{name}=VALUE")
        section, _, key = name.partition(".")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(
                f"command line: --{name} holds bytes that are not UTF-8 text; give the value "
                "in UTF-8"
            ) from None
        _set(cfg, section, key, _parse_value(text), "command line")
    return cfg


def config_from_argv(argv: list[str], prog: str = "train.py") -> tuple[Path | None, Config]:
    """``prog [CONFIG.toml] [--section.key=value ...]`` with ``--help``; a bad config exits
    with status 2 and the message on stderr, as argparse does."""
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: {prog} [CONFIG.toml] [--section.key=value ...]\n\n{config_help()}")
        raise SystemExit(0)
    path = Path(argv[0]) if argv and not argv[0].startswith("--") else None
    try:
        cfg = load_config(path, argv[1:] if path else argv)
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return path, cfg


# -- writing TOML --------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """``value`` as a TOML value: true/false, numbers, basic strings, arrays, inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} to TOML")


SHORT_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped, every other
    character as itself (JSON's ensure_ascii escapes would split a character outside the
    Basic Multilingual Plane into two surrogate escapes, which TOML refuses)."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in SHORT_ESCAPES:
            out.append(SHORT_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ConfigError(f"{text!r}: holds a lone surrogate, which is not text TOML can hold")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else toml_value(key)


def _derived_grad_accum(cfg: Config) -> bool:
    return cfg.train.global_batch_size is not None and "train.grad_accum" not in cfg.given


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML that ``load_config`` reads back to an equal Config.
    None values are left out: every optional field defaults to None."""
    out = []
    for section in SECTIONS:
        table = (
            dataclasses.asdict(getattr(cfg, section)) if section != "deepspeed" else cfg.deepspeed
        )
        if section == "train" and _derived_grad_accum(cfg):
            table.pop("grad_accum")  # it follows the world size: re-derived when read back
        out.append(f"[{section}]")
        out += [f"{_toml_key(k)} = {toml_value(v)}" for k, v in table.items() if v is not None]
        out.append("")
    return "\n".join(out)


def save_config(cfg: Config, path: str | Path) -> None:
    write_atomic(path, to_toml(cfg))


# -- help text and the reference page --------------------------------------------------------


def config_help() -> str:
    """Every key with its type, default and one-line description."""
    lines = []
    defaults = Config()
    for section in SECTION_TYPES:
        lines.append(f"[{section}]")
        for key, (tp, help) in _section_fields(section).items():
            default = getattr(getattr(defaults, section), key)
            lines.append(f"  --{section}.{key}=<{_type_name(tp)}>  {help} (default: {default!r})")
    lines.append("[deepspeed]")
    lines.append(
        "  --deepspeed.<key>[.<key>...]=<value>  passed on to the DeepSpeed config (the keys "
        "are listed in docs/configuration.md)"
    )
    return "\n".join(lines)


def _range_text(meta: dict, key: str) -> str:
    if key in CHOICES:
        return " \\| ".join(CHOICES[key])
    lo, hi = meta.get("min", meta.get("above")), meta.get("max", meta.get("below"))
    if lo is None and hi is None:
        return ""
    left = ("[" if "min" in meta else "(") + f"{lo}" if lo is not None else "(-inf"
    right = f"{hi}" + ("]" if "max" in meta else ")") if hi is not None else "inf)"
    return f"{left}, {right}"


SECTION_HELP = {
    "model": "The network's shape and switches (gpt/model.py). With `train.init_from` the shape "
    "comes from the checkpoint.",
    "data": "The prepared data set (`python -m gpt.data.prepare`, docs/data.md), or a weighted "
    "mixture of several (docs/data.md#mixtures).",
    "train": "The run: steps, batch, evaluation, checkpoints, logging, precision.",
    "optim": "AdamW and the learning-rate schedule (linear warmup, cosine decay).",
    "finetune": "Adapting a model loaded with `train.init_from` (docs/finetune.md).",
}


def config_markdown() -> str:
    """docs/configuration.md: every section and key with its type, default, valid range and
    description (``python -m gpt.config_io > docs/configuration.md``; a test keeps it
    current)."""
    # here, not at the top: reading a config (gpt.run, the tools) must not load the trainer
    from gpt.train.engine import DEEPSPEED_KEYS, DEEPSPEED_REFUSED

    out = [
        "# Configuration reference",
        "",
        "Generated from `gpt/config.py` by `python -m gpt.config_io > docs/configuration.md`.",
        "A run's config is a TOML file of these sections; any key can be overridden on the",
        "command line as `--section.key=value` (a TOML value). Precedence: defaults < file <",
        "command line. Every value is checked before any work: an unknown key, a wrong type or",
        "a value outside its range exits with status 2 and a message naming the key. Relative",
        "paths are relative to the directory `train.py` runs in.",
        "",
    ]
    defaults = Config()
    for section, cls in SECTION_TYPES.items():
        out += [f"## [{section}]", "", SECTION_HELP[section], ""]
        out += ["| key | type | default | valid | meaning |", "|---|---|---|---|---|"]
        for key, (tp, help) in _section_fields(section).items():
            value = getattr(getattr(defaults, section), key)
            default = "(none)" if value is None else f"`{toml_value(value)}`"
            meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == key)
            cells = [
                f"`{key}`",
                _type_name(tp).replace("|", "or"),
                default,
                _range_text(meta, f"{section}.{key}"),
                help.replace("|", "\\|"),
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out += [
        "## [deepspeed]",
        "",
        "Passed on to DeepSpeed's config, merged over what `gpt/train/engine.py` derives",
        "(batch sizes, ZeRO stage, precision). Only the keys below are passed on, each checked",
        "(a key DeepSpeed would ignore, or one misspelt, is an error naming it). Example:",
        "`--deepspeed.zero_optimization.stage=2`.",
        "",
        "| key | valid |",
        "|---|---|",
        *(f"| `{k}` | {rule} |" for k, (rule, _) in DEEPSPEED_KEYS.items()),
        "",
        '`fp16.*` apply with `train.dtype = "fp16"` only; `bf16.enabled = true` (bf16',
        "weights and DeepSpeed's optimizer wrapper instead of autocast) needs",
        '`train.dtype = "bf16"`.',
        "",
        "Refused, because the trainer derives them, overrides them or does not use them:",
        "",
        "| key | why | set instead |",
        "|---|---|---|",
        *(f"| `{k}` | {why} | {instead} |" for k, (why, instead) in DEEPSPEED_REFUSED.items()),
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    print(config_markdown(), end="")
