"""The documentation cannot rot: every command in a ```sh block of README.md and docs/*.md is
checked against the code it names.

- ``make TARGET``: the target exists in the Makefile;
- ``train.py CONFIG --section.key=value ...`` (directly, or under torchrun, deepspeed or srun):
  the config file exists and loads with those overrides (every key and type checked);
- ``sample.py ...`` and ``python -m gpt.eval ...``: the command's own argument parser accepts
  the flags (so the old ``sample.py --eval`` form, which still forwards, is not documented);
- ``python -m MODULE ...`` and ``python SCRIPT.py ...``: the module or script exists and every
  ``--flag`` given appears in its ``--help``; ``--section.key=value`` flags, which the bench
  scripts pass on to the trainer, load as config overrides;
- ``bash`` / ``sbatch`` scripts exist; here-documents' bodies are not commands.
Commands outside the project (pip, git, cd, ...) pass. Running them all at full size would
take hours; what they do is tested where it is built (the trainer, sampler, data and export
tests run the same code scaled down), README's walk-through runs scaled down in
test_readme.py, and docs/data.md's commands run as written in test_data_docs.py.
"""

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(?:sh|bash)\n(.*?)```", re.S)
OUTSIDE = {"pip", "git", "cd", "source", "export", "ls", "cat", "nvidia-smi", "squeue", "tail",
           "wandb", "tar", "mkdir", "scontrol", "echo", "du", "cp", "mv", "rm", "watch",
           "printf", "head", "grep", "jq", "wait", "kill", "sleep", "pytest",
           ".venv/bin/pytest"}  # fmt: skip
PYTHONS = {"python", "python3", ".venv/bin/python"}


HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)'?\"?[^\n]*\n.*?^\1$", re.S | re.M)


def split_lines(block: str) -> list[str]:
    """The block's commands: split at newlines, ;, && and | outside quotes; backslash
    continuations joined; comments and here-documents' bodies dropped."""
    text = HEREDOC.sub("", block)
    text = text.replace("\\\n", " ")
    out, current, quote, i = [], "", None, 0
    while i < len(text):
        c = text[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (not current or current[-1].isspace()):
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        elif c in "\n;|&":
            out.append(current)
            current = ""
            i += 1
            continue
        current += c
        i += 1
    out.append(current)
    return [c.strip().removeprefix("$ ") for c in out if c.strip()]


def commands(page: Path) -> list[str]:
    """Each shell command of the page's sh blocks."""
    return [c for block in FENCE.findall(page.read_text()) for c in split_lines(block)]


def cases():
    return [
        pytest.param(page, command, id=f"{page.name}: {command[:60]}")
        for page in PAGES
        for command in commands(page)
    ]


@cache
def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_./-]+):", text, re.M))


@cache
def help_text(*program: str) -> str:
    done = subprocess.run(
        [sys.executable, *program, "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{' '.join(program)} --help failed: {done.stderr[-500:]}"
    return done.stdout


def check_train(args: list[str]) -> None:
    from gpt.config_io import load_config

    config = [a for a in args if not a.startswith("-")]
    overrides = [a for a in args if a.startswith("--")]
    if config:
        assert (ROOT / config[0]).is_file() or config[0].startswith(("out/", "$", "/")), config
        if (ROOT / config[0]).is_file():
            load_config(ROOT / config[0], overrides)
            return
    load_config(None, overrides)


def check_flags(args: list[str], program: tuple[str, ...]) -> None:
    """Every --flag is in the program's --help; --section.key=value flags (which the bench
    scripts pass on to the trainer) must be valid config overrides."""
    from gpt.config_io import load_config

    text = help_text(*program)
    overrides = [a for a in args if re.match(r"--[a-z_]+\.[a-z_.]+=", a)]
    if overrides:
        load_config(None, overrides)
    for flag in (a.split("=")[0] for a in args if a.startswith("--") and a not in overrides):
        assert flag in text, f"{' '.join(program)} has no {flag} (see its --help)"


def check(command: str) -> None:
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:  # a plain assignment, VAR=value
        return
    program, args = words[0], words[1:]
    if program == "make":
        for target in (a for a in args if not a.startswith("-") and "=" not in a):
            assert target in makefile_targets(), f"make {target}: no such target"
        return
    if program in ("torchrun", "deepspeed", "srun"):
        script = next((i for i, a in enumerate(args) if a.endswith(".py")), None)
        assert script is not None, f"{command}: no script"
        program, args = sys.executable, args[script:]
    if program in PYTHONS or program == sys.executable:
        if args[:1] == ["-m"]:
            module, rest = args[1], args[2:]
            from importlib.util import find_spec

            assert find_spec(module) is not None, f"no module {module}"
            if module == "gpt.eval":
                from gpt.cli.evaluate import parse_args

                parse_args(rest)
                return
            check_flags(rest, ("-m", module))
            return
        if args[:1] in (["-c"], ["-"]):  # inline code or a here-document
            return
        script, rest = args[0], args[1:]
        assert (ROOT / script).is_file(), f"no script {script}"
        if script == "train.py" and rest == ["--help"]:
            assert "--train.max_steps" in help_text("train.py")
        elif script == "train.py":
            check_train(rest)
        elif script == "sample.py":
            from gpt.cli.sample import parse_args

            parse_args(rest)
        else:
            check_flags(rest, (script,))
        return
    if program in ("bash", "sbatch", "sh"):
        script = next((a for a in args if not a.startswith("-")), "")
        assert (ROOT / script).is_file(), f"{command}: no script {script!r}"
        return
    assert program in OUTSIDE, f"{command}: unknown program {program!r}; teach test_docs.py"


@pytest.mark.parametrize("page, command", cases())
def test_documented_command_matches_the_code(page, command):
    check(command)


def test_every_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize(
    "command",
    [
        "make no-such-target",
        "python train.py configs/tiny.toml --train.no_such_key=1",
        "python train.py configs/missing.toml",
        "python bench/attention.py --no-such-flag",
        "python -m gpt.kernels.bench",
        "python train.py configs/tiny.toml --bench.steps=10",
        "python bench/trainer.py configs/tiny.toml --bench.steps=10",
        "python bench/step_syncs.py configs/tiny.toml --train.micro_batch_size=zero",
        "python sample.py --ckpt out/tiny --no-such-flag",
        "python sample.py --ckpt out/tiny --eval tasks/ --shots 0 1",  # now python -m gpt.eval
        "python -m gpt.eval --ckpt out/tiny --tasks tasks/ --shots 1 1",
        "bash bench/gpu/gone.sh",
        "frobnicate --all",
    ],
)
def test_the_checker_catches_stale_commands(command):
    from gpt.config import ConfigError

    with pytest.raises((AssertionError, SystemExit, ConfigError)):
        check(command)
