"""What runs and exports hold on disk, read back verified: the one loader every tool uses.

The trainer (resume, pruning), ``sample.py`` (sampling and evaluation), the exporter
(``python -m gpt.convert``) and ``train.init_from`` find checkpoints and load models only
through this module, and none of them trusts a file it has not checked:

- A checkpoint is ``checkpoints/step_NNNNNNNN`` (eight digits) whose ``COMPLETE`` file holds
  its own name and whose ``checksums.json`` maps exactly the files present (no more, no
  fewer) to their sha256. Anything else under ``checkpoints/`` is not a checkpoint: never
  read, never pruned.
- ``latest`` is a hint holding the bare name of a sibling checkpoint. Anything else (a path,
  ``..``, binary bytes, a checkpoint that is missing or incomplete) is ignored with a warning,
  and the newest complete checkpoint is used instead.
- Before a file is read its sha256 is compared with the table: the trainer checks every file
  of the checkpoint it resumes from; an inference load checks the files it reads (the
  ``model/`` or ``adapters/`` entries; the weights through the model directory's own
  ``checksums.json``, whose entry the checkpoint's table covers).
- A model directory (an export) with a ``checksums.json`` has each file listed there checked
  (``config.json`` is not listed: editing it by hand is legitimate, and every key of it is
  validated when read). Hugging Face directories have no table: nothing to check them by.
- LoRA adapters pin their base (``adapter.json``: the base checkpoint or model directory and
  the sha256 of its weights); a base that changed or is gone is refused, naming it.

Both tables, a checkpoint's and an export's, are one format, written by ``write_checksums``
and read by ``read_checksums``: a JSON object ``{"relative/path": sha256}``. Tables written
before that (an export's on one line, a checkpoint's without its ``model/checksums.json``)
are the same object and stay readable. Run directories as a whole are gpt/run.py's.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gpt.fileio import sha256_file, write_atomic

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
LATEST = "latest"
CHECKSUMS = "checksums.json"
ADAPTERS = "adapters"
MODEL = "model"
WEIGHTS = "model.safetensors"
NAME = re.compile(r"step_(\d{8})")
SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(RuntimeError):
    """A checkpoint or model that cannot be used (damaged, unsafe, from another run, or
    adapters whose base changed); the message names the file."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------
# Checkpoints of a run
# ------------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint directory; ValueError for a name that is not one."""
    match = NAME.fullmatch(path.name)
    if match is None:
        raise ValueError(f"{path}: not a checkpoint name (step_ and eight digits)")
    return int(match[1])


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a checkpoint the trainer finished: a directory (not a link) whose
    name is a checkpoint name and whose COMPLETE file, written last, names it (a copy under
    another name does not count). Says nothing about the contents: ``verify_checksums``."""
    if NAME.fullmatch(path.name) is None or path.is_symlink():
        return False
    try:
        return (path / COMPLETE).read_bytes().strip() == path.name.encode()
    except OSError:
        return False


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_complete(p)), key=checkpoint_step)


WARNED: set[str] = set()  # each `latest` problem is reported once per process


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names when it names a complete sibling, else (with a warning)
    the newest complete checkpoint; None when there is none."""
    root = Path(out_dir) / CHECKPOINTS
    hint = root / LATEST
    found = complete_checkpoints(out_dir)
    if hint.is_file():
        raw = hint.read_bytes().strip()
        named = raw.decode("ascii", "replace")
        if NAME.fullmatch(named) and is_complete(root / named):
            return root / named
        shown = named if named.isprintable() and len(named) < 80 else f"{len(raw)} bytes"
        newest = found[-1].name if found else "none"
        message = f"{hint} names {shown!r}, not a complete checkpoint beside it; using {newest}"
        if message not in WARNED:
            WARNED.add(message)
            warn(message)
    return found[-1] if found else None


PINS = "pins"  # checkpoints/pins/*.json: checkpoints LoRA runs train on, kept by pruning


def keep_for(ckpt: Path, run: Path) -> None:
    """Record, beside a checkpoint of another run, that ``run`` trains adapters on it, so that
    run's pruning keeps it (``pinned_checkpoints``). One file per adapting run; delete it to
    release the checkpoint. Nothing is recorded for a model directory (an export)."""
    if ckpt.parent.name != CHECKPOINTS or not is_complete(ckpt):
        return
    run = run.resolve()
    key = hashlib.sha256(str(run).encode()).hexdigest()[:16]
    record = {"checkpoint": ckpt.name, "adapters": str(run)}
    write_atomic(ckpt.parent / PINS / f"{key}.json", json.dumps(record) + "\n")


def pinned_checkpoints(out_dir: str | Path) -> dict[str, str]:
    """{checkpoint name: the run that adapts it} of a run's pins (damaged ones are skipped
    with a warning: they keep nothing)."""
    folder = Path(out_dir) / CHECKPOINTS / PINS
    pinned = {}
    for file in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(file.read_bytes())
            pinned[str(record["checkpoint"])] = str(record["adapters"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            warn(f"{file}: ignored ({err})")
    return pinned


# ------------------------------------------------------------------------------------------
# Checksum tables
# ------------------------------------------------------------------------------------------


def listed_files(root: Path) -> list[str]:
    """Every file under ``root`` a checkpoint's table must list (all but COMPLETE and the
    table itself), as relative paths."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() not in (COMPLETE, CHECKSUMS)
    )


def write_checksums(root: Path, names: list[str] | None = None) -> None:
    """sha256 of ``names`` (default: every file ``listed_files`` finds) into
    ``root/checksums.json``: the one writer of both tables, a checkpoint's and an export's
    (hashed in threads: hashlib releases the GIL)."""
    names = listed_files(root) if names is None else names
    table = dict(zip(names, _digests(root, names), strict=True))
    write_atomic(root / CHECKSUMS, json.dumps(table, indent=1) + "\n")


def _digests(root: Path, names: list[str]) -> list[str]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda n: sha256_file(root / n), names))


def read_checksums(root: Path) -> dict[str, str]:
    """``root/checksums.json``: a JSON object of relative paths (no ``..``, not absolute) to
    lowercase hex sha256; CheckpointError naming the file otherwise. Also reads the tables
    written before ``write_checksums`` wrote both (exports' on one line, checkpoints' without
    their ``model/checksums.json``): the same object, so the same check."""
    file = root / CHECKSUMS
    try:
        table = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; without it nothing here can be verified") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file}: damaged ({err})") from None
    if not isinstance(table, dict) or not table:
        raise CheckpointError(
            f"{file}: damaged: expected an object of file -> sha256, got {json.dumps(table)[:60]}"
        )
    for name, digest in table.items():
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not parts:
            raise CheckpointError(f"{file}: damaged: {name!r} is not a path inside {root}")
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise CheckpointError(f"{file}: damaged: the entry for {name} is not a sha256")
    return table


def check_files(root: Path, table: dict[str, str], names: list[str], remedy: str) -> None:
    """The files ``names`` of ``root`` exist and have the sha256 ``table`` lists for them;
    CheckpointError naming the first that does not (``remedy``: what the user can do)."""
    for name in names:
        if not (root / name).is_file():
            raise CheckpointError(f"{root / name}: missing (listed in {root / CHECKSUMS})")
    for name, digest in zip(names, _digests(root, names), strict=True):
        if digest != table[name]:
            raise CheckpointError(f"{root / name}: checksum mismatch ({remedy})")


def verify_checksums(
    root: Path, only: str | None = None, skip: tuple[str, ...] = ()
) -> dict[str, str]:
    """Check a checkpoint against its table: the table lists exactly the files present, and
    the files (all, or those under the folder ``only``; but ``skip``) have the listed sha256.
    Returns the table; CheckpointError naming the first file missing, unlisted or altered."""
    table = read_checksums(root)
    present = set(listed_files(root))
    for name in sorted(set(table) - present):
        raise CheckpointError(f"{root / name}: missing (listed in {root / CHECKSUMS})")
    unlisted = present - set(table)
    if not any(Path(n).name == CHECKSUMS for n in table):
        # a table written before sidecars were listed: model/checksums.json is checked by
        # its own entries, and the weights it covers are listed here (see _verify)
        unlisted = {n for n in unlisted if Path(n).name != CHECKSUMS}
    for name in sorted(unlisted):
        raise CheckpointError(f"{root / name}: not listed in {root / CHECKSUMS}")
    names = sorted(n for n in table if (only is None or Path(n).parts[0] == only) and n not in skip)
    check_files(root, table, names, "the file changed after it was saved")
    return table


def verify_model_dir(path: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Check the files an export's ``checksums.json`` lists (but ``skip``); returns the table,
    {} when there is none (a Hugging Face directory, or an export older than tables)."""
    if not (path / CHECKSUMS).is_file():
        return {}
    table = read_checksums(path)
    if WEIGHTS not in table:
        raise CheckpointError(f"{path / CHECKSUMS}: damaged: it does not list {WEIGHTS}")
    names = [n for n in table if n not in skip]
    remedy = "the file changed or was damaged after it was written; export or copy it again"
    check_files(path, table, names, remedy)
    return table


# ------------------------------------------------------------------------------------------
# What a path given to a tool refers to
# ------------------------------------------------------------------------------------------


@dataclass
class Source:
    """A model as a tool names it: ``checkpoint`` is set when the path is a run or one
    checkpoint; then exactly one of ``model_dir`` and ``adapters`` exists in it."""

    path: Path
    checkpoint: Path | None
    model_dir: Path | None
    adapters: Path | None

    @property
    def where(self) -> Path:
        """The exact place the weights come from: the checkpoint, or the model directory."""
        return self.checkpoint or self.model_dir


def locate(path: str | Path) -> Source:
    """What ``path`` refers to: a model directory (config.json + model.safetensors), one
    checkpoint, or a run directory (its latest complete checkpoint). Reads no weights."""
    path = Path(path)
    if (path / "config.json").is_file():
        return Source(path, None, path, None)
    if is_complete(path):
        ckpt = path
    elif (path / COMPLETE).is_file():
        raise CheckpointError(
            f"{path}: its {COMPLETE} file does not name it: not a checkpoint the trainer "
            "finished (a copy or a renamed folder?)"
        )
    else:
        ckpt = latest_checkpoint(path)
    if ckpt is None:
        if (path / CHECKPOINTS).is_dir():
            raise FileNotFoundError(f"{path}: the run has no complete checkpoint yet")
        raise FileNotFoundError(
            f"{path}: not a model directory (config.json + model.safetensors), a checkpoint "
            f"({COMPLETE} + model/) or a run directory (checkpoints/)"
        )
    if (ckpt / ADAPTERS).is_dir():
        return Source(path, ckpt, None, ckpt / ADAPTERS)
    return Source(path, ckpt, ckpt / MODEL, None)


def _verify(source: Source) -> None:
    """Check the files a load of ``source`` reads, short of the weights of a model directory
    (``GPT.from_pretrained`` checks those against the directory's own table, whose entry is
    checked here)."""
    if source.checkpoint is None:
        return
    if source.adapters is not None:
        verify_checksums(source.checkpoint, only=ADAPTERS)
        return
    sidecar, weights = f"{MODEL}/{CHECKSUMS}", f"{MODEL}/{WEIGHTS}"
    covered = sidecar in read_checksums(source.checkpoint)  # then the sidecar vouches for them
    verify_checksums(source.checkpoint, only=MODEL, skip=(weights,) if covered else ())


def read_adapter_info(adapters: Path) -> dict:
    """``adapter.json`` with its types checked; CheckpointError naming the file."""
    file = adapters / "adapter.json"
    try:
        info = json.loads(file.read_bytes())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable ({err})") from None
    types = {"rank": int, "alpha": (int, float), "targets": list, "base": (dict, str)}
    for key, tp in types.items():
        if not isinstance(info, dict) or not isinstance(info.get(key), tp):
            raise CheckpointError(f"{file}: damaged: {key} missing or of the wrong type")
    base = info["base"]
    if isinstance(base, str):  # written before bases were pinned: a path, no weights' hash
        info["base"] = {"path": base, "sha256": None}
    elif not isinstance(base.get("path"), str) or not SHA256.fullmatch(str(base.get("sha256"))):
        raise CheckpointError(f"{file}: damaged: base must hold a path and a sha256")
    return info


def weights_digest(source: Source) -> str:
    """The sha256 that identifies the weights ``source`` loads: the adapters' (a LoRA
    checkpoint, whose base is pinned in turn), else the model weights' from the table that
    covers them, else (a directory without a table) computed."""
    if source.adapters is not None:
        return read_checksums(source.checkpoint)[f"{ADAPTERS}/adapters.safetensors"]
    if (source.model_dir / CHECKSUMS).is_file():
        table = read_checksums(source.model_dir)
        if WEIGHTS in table:
            return table[WEIGHTS]
    weights = (source.model_dir / WEIGHTS).resolve()
    st = weights.stat()
    key = (str(weights), st.st_size, st.st_mtime_ns)
    if key not in COMPUTED:  # a directory without a table (Hugging Face's): hashed once
        COMPUTED[key] = sha256_file(weights)
    return COMPUTED[key]


COMPUTED: dict[tuple, str] = {}  # sha256 of weights without a table, by path, size, mtime


def pin(path: str | Path) -> dict:
    """What adapters trained on the model at ``path`` record as their base: the exact
    checkpoint or model directory (absolute) and the sha256 of its weights."""
    source = locate(path)
    return {"path": str(source.where.resolve()), "sha256": weights_digest(source)}


def base_of(adapters: Path) -> Source:
    """The pinned base of a LoRA checkpoint, checked: CheckpointError naming it when it is
    gone or its weights changed since the adapters were trained."""
    info = read_adapter_info(adapters)
    base, file = info["base"], adapters / "adapter.json"
    if base["sha256"] is None:
        raise CheckpointError(
            f"{file}: names its base only as {base['path']!r} (written before bases were "
            "pinned), so nothing says whether that still holds the weights these adapters "
            "were trained on; resume the LoRA run once with this version (it pins the base at "
            "its next checkpoint), or retrain it"
        )
    where = Path(base["path"])
    if not where.exists():
        raise CheckpointError(
            f"{file}: the base these adapters were trained on, {where}, is gone (moved, pruned "
            "or deleted); put it back there, or copy it there from a backup"
        )
    source = locate(where)
    if weights_digest(source) != base["sha256"]:
        raise CheckpointError(
            f"{file}: the base {where} holds other weights than the ones these adapters were "
            f"trained on (sha256 {base['sha256'][:12]}...); restore that base"
        )
    return source


def load_model(path: str | Path, **overrides):
    """The GPT at ``path`` (a model directory, a checkpoint or a run directory), verified,
    with the adapters of a LoRA checkpoint merged into their pinned base: a plain model
    either way. ``overrides`` as for ``GPT.from_pretrained``."""
    from gpt.model import GPT

    source = locate(path)
    _verify(source)
    if source.adapters is None:
        return GPT.from_pretrained(source.model_dir, **overrides)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from gpt.lora import add_lora, merge_lora

    info = read_adapter_info(source.adapters)
    model = load_model(base_of(source.adapters).where, **overrides)
    add_lora(model, info["rank"], info["alpha"], 0.0, info["targets"])
    file = source.adapters / "adapters.safetensors"
    try:
        state = load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: cannot read the adapters ({err})") from None
    expected = {n for n, _ in model.named_parameters() if ".lora_" in n}
    if set(state) != expected:
        raise CheckpointError(
            f"{file}: the adapters do not fit their base {info['base']['path']}: "
            f"{sorted(set(state) ^ expected)[:4]}"
        )
    model.load_state_dict(state, strict=False)
    return merge_lora(model)


def model_dir_of(path: str | Path) -> Path:
    """The model directory whose config ``load_model(path)`` builds: ``path``'s own, or, for
    a LoRA run or checkpoint, its pinned base's."""
    source = locate(path)
    while source.adapters is not None:
        source = base_of(source.adapters)
    return source.model_dir


def model_config_of(path: str | Path):
    """The ModelConfig recorded with the model at ``path`` (as ``load_model`` resolves it;
    for a LoRA run its base's, which the merge keeps), the attention backend it was trained
    with included. Reads config.json only."""
    from gpt.convert import read_model_config

    return read_model_config(model_dir_of(path))


def tokenizer_of(path: str | Path) -> str | None:
    """The tokenizer recorded with the model at ``path`` (as ``load_model`` resolves it)."""
    from gpt.convert import tokenizer_name

    source = locate(path)
    if source.adapters is not None:
        recorded = read_adapter_info(source.adapters).get("tokenizer")
        if isinstance(recorded, str):
            return recorded
    return tokenizer_name(model_dir_of(path))
