"""gpt/store.py: the one verified loader. `latest` must name a sibling checkpoint, the checksum
table must be complete and exact, every file a tool reads is checked first, and LoRA adapters
load only onto the exact base they were trained on."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import config
from test_finetune import finetune_config

from gpt import store
from gpt.cli import sample, train
from gpt.config_io import load_config, save_config
from gpt.convert.__main__ import main as convert
from gpt.train.finetune import build_model, init_model_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A 10-step base run (checkpoints 5, 10) and a 3-step LoRA run on it (trained once)."""
    tmp = tmp_path_factory.mktemp("store")
    path, base = config(tmp, data_dir, "base")
    assert train.main([str(path), "--train.eval_interval=0"]) == 0
    lora_path, lora = finetune_config(
        tmp, "lora", base, data_dir, data_dir, lora_rank=2, lora_alpha=4.0
    )
    args = [str(lora_path), "--train.max_steps=3", "--train.eval_interval=0"]
    assert train.main(args) == 0
    return tmp, base, lora


@pytest.fixture
def copy(tmp_path, trained):
    """A copy of both runs to damage, with the LoRA run's pin moved to the copied base."""
    tmp, base, lora = trained
    shutil.copytree(base, tmp_path / "base")
    shutil.rmtree(tmp_path / "base" / "checkpoints" / "pins")  # the original LoRA run's
    shutil.copytree(lora, tmp_path / "lora")
    for ckpt in store.complete_checkpoints(tmp_path / "lora"):
        info_file = ckpt / "adapters" / "adapter.json"
        info = json.loads(info_file.read_text())
        info["base"]["path"] = info["base"]["path"].replace(str(base), str(tmp_path / "base"))
        info_file.write_text(json.dumps(info))
        store.write_checksums(ckpt)
    return tmp_path / "base", tmp_path / "lora"


def relocated(run, **train_keys):
    """The run's own config.toml with train keys replaced, written beside the run."""
    cfg = load_config(run / "config.toml")
    cfg.train.out_dir = str(run)
    for key, value in train_keys.items():
        setattr(cfg.train, key, value)
    path = run.parent / f"{run.name}.toml"
    save_config(cfg, path)
    return path


def train_on(run, steps: int) -> None:
    args = [str(relocated(run)), f"--train.max_steps={steps}", "--train.eval_interval=0"]
    assert train.main(args) == 0


def test_latest_must_name_a_sibling_checkpoint(copy, tmp_path, capsys):
    base, _ = copy
    other = tmp_path / "other"
    shutil.copytree(base, other)
    hint = base / "checkpoints" / "latest"
    for named in [
        str(other / "checkpoints" / "step_00000005"),
        "../../other/checkpoints/step_00000005",
        "step_00000005/../../../other/checkpoints/step_00000005",
        "\x00\xff binary",
        "step_00000099",
    ]:
        hint.write_bytes(named.encode("utf-8", "surrogateescape"))
        assert store.latest_checkpoint(base) == base / "checkpoints" / "step_00000010"
        assert f"{hint} names" in capsys.readouterr().err
    hint.write_text("step_00000005")  # a sibling: honoured
    assert store.latest_checkpoint(base) == base / "checkpoints" / "step_00000005"


@pytest.mark.parametrize("table", ["null", "[]", "{}", '{"model/config.json": 5}', "drop"])
def test_a_checksum_table_that_is_not_complete_and_exact_is_refused(copy, table):
    base, _ = copy
    ckpt = base / "checkpoints" / "step_00000010"
    file = ckpt / "checksums.json"
    if table == "drop":
        entries = json.loads(file.read_text())
        del entries["trainer.json"]
        table = json.dumps(entries)
    file.write_text(table)
    with pytest.raises(store.CheckpointError, match=rf"{ckpt}.*(damaged|not listed)"):
        store.verify_checksums(ckpt)
    with pytest.raises(store.CheckpointError):
        store.load_model(base)


def test_a_file_the_table_does_not_list_is_refused(copy):
    base, _ = copy
    ckpt = base / "checkpoints" / "step_00000010"
    (ckpt / "model" / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(store.CheckpointError, match=r"extra.safetensors: not listed in"):
        store.load_model(ckpt)


def test_a_checkpoint_copied_under_another_name_is_not_one(copy):
    base, _ = copy
    copied = base / "checkpoints" / "step_00000001"
    shutil.copytree(base / "checkpoints" / "step_00000005", copied)
    assert copied not in store.complete_checkpoints(base)
    with pytest.raises(store.CheckpointError, match="COMPLETE file does not name it"):
        store.locate(copied)


def test_a_flipped_byte_in_the_adapters_is_refused_by_every_tool(copy, tmp_path, capsys):
    _, lora = copy
    adapters = store.latest_checkpoint(lora) / "adapters" / "adapters.safetensors"
    raw = bytearray(adapters.read_bytes())
    raw[-10] ^= 0x01
    adapters.write_bytes(bytes(raw))
    with pytest.raises(store.CheckpointError, match=rf"{adapters}: checksum mismatch"):
        store.load_model(lora)
    assert convert([str(lora), str(tmp_path / "export")]) == 2
    assert f"{adapters}: checksum mismatch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--ckpt", str(lora), "--prompt", "a", "--max-new-tokens", "2"])
    assert exit_.value.code == 2
    assert f"{adapters}: checksum mismatch" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()


def test_adapters_pin_their_exact_base(copy):
    base, lora = copy
    info = store.read_adapter_info(store.latest_checkpoint(lora) / "adapters")
    pinned = base / "checkpoints" / "step_00000010"
    assert info["base"]["path"] == str(pinned.resolve())
    table = json.loads((pinned / "model" / "checksums.json").read_text())
    assert info["base"]["sha256"] == table["model.safetensors"]
    merged = store.load_model(lora)
    assert store.model_dir_of(lora) == pinned / "model"
    assert store.model_config_of(lora) == merged.cfg  # the base's, which the merge keeps
    # the base run trains on: the adapters still load onto the pinned checkpoint
    train_on(base, 12)
    assert store.latest_checkpoint(base).name == "step_00000012"
    again = store.load_model(lora)
    for (name, a), b in zip(merged.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_changed_or_missing_base_is_refused_naming_it(copy):
    base, lora = copy
    pinned = base / "checkpoints" / "step_00000010"
    weights = pinned / "model" / "model.safetensors"
    other = base / "checkpoints" / "step_00000005" / "model"
    shutil.copy(other / "model.safetensors", weights)  # other weights, consistent tables
    shutil.copy(other / "checksums.json", pinned / "model" / "checksums.json")
    store.write_checksums(pinned)
    with pytest.raises(store.CheckpointError, match=rf"the base {pinned} holds other weights"):
        store.load_model(lora)
    shutil.rmtree(pinned)
    with pytest.raises(store.CheckpointError, match=rf"the base .*, {pinned}, is gone"):
        store.load_model(lora)


def test_a_lora_run_resumes_only_on_its_base(copy, capsys):
    """The base run trained on: `init_from = BASE_RUN` now names other weights. Resuming the
    LoRA run is refused (status 2), naming the checkpoint to point init_from at."""
    base, lora = copy
    lora_config = relocated(lora, init_from=str(base))
    train_on(base, 12)
    assert train.main([str(lora_config), "--train.max_steps=4"]) == 2
    err = capsys.readouterr().err
    pinned = (base / "checkpoints" / "step_00000010").resolve()
    assert f"its adapters were trained on the base {pinned}" in err
    assert f"--train.init_from={pinned}" in err
    assert train.main([str(lora_config), "--train.max_steps=4", f"--train.init_from={pinned}"]) == 0


def test_init_from_a_lora_run_starts_from_the_merged_model(copy, tmp_path, data_dir):
    """The docs promise init_from takes a LoRA run: its adapters merged into its base."""
    _, lora = copy
    path, out = finetune_config(tmp_path, "after-lora", lora, data_dir, data_dir)
    cfg = load_config(path)
    cfg.model = init_model_config(cfg)
    built = build_model(cfg)
    merged = store.load_model(lora)
    for (name, a), b in zip(merged.state_dict().items(), built.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert train.main([str(path), "--train.max_steps=1", "--train.eval_interval=0"]) == 0


def test_the_base_run_keeps_the_checkpoint_adapters_train_on(copy):
    """Training the base run on with keep_checkpoints = 1 would prune the pinned base: the
    LoRA run recorded it in the base run's checkpoints/pins/, so it is kept."""
    base, lora = copy
    pinned = store.read_adapter_info(store.latest_checkpoint(lora) / "adapters")["base"]
    store.keep_for(Path(pinned["path"]), lora)  # what the LoRA trainer does at its start
    assert store.pinned_checkpoints(base) == {"step_00000010": str(lora.resolve())}
    path = relocated(base, keep_checkpoints=1)
    assert train.main([str(path), "--train.max_steps=13", "--train.eval_interval=0"]) == 0
    kept = sorted(p.name for p in (base / "checkpoints").iterdir())
    assert kept == ["latest", "pins", "step_00000010", "step_00000013"]
    store.load_model(lora)  # still loads
    for file in (base / "checkpoints" / "pins").iterdir():
        file.unlink()  # released: the next save prunes it
    assert train.main([str(path), "--train.max_steps=14", "--train.eval_interval=0"]) == 0
    assert [p.name for p in store.complete_checkpoints(base)] == ["step_00000014"]


def test_a_lora_run_records_its_base_as_kept(trained):
    _, base, lora = trained
    assert store.pinned_checkpoints(base) == {"step_00000010": str(lora.resolve())}


def test_a_lora_run_from_before_pins_resumes_on_its_base_and_tools_say_how(copy, capsys):
    base, lora = copy
    newest = store.latest_checkpoint(lora)
    info_file = newest / "adapters" / "adapter.json"
    info = json.loads(info_file.read_text())
    info["base"] = str(base.resolve())  # the old format: init_from resolved
    info_file.write_text(json.dumps(info))
    store.write_checksums(newest)
    with pytest.raises(store.CheckpointError, match="resume the LoRA run once with this version"):
        store.load_model(lora)
    path = relocated(lora, init_from=str(base))
    assert train.main([str(path), "--train.max_steps=4", "--train.eval_interval=0"]) == 0
    assert "names its base by path only" in capsys.readouterr().err
    pinned = store.read_adapter_info(store.latest_checkpoint(lora) / "adapters")["base"]
    assert pinned["sha256"] is not None
    store.load_model(lora)  # pinned from the next checkpoint on


# ------------------------------------------------------------------------------------------
# One checksum format: one writer for checkpoints and exports; tables from before still read
# ------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


def test_an_export_lists_its_files_in_the_one_format(model_dir):
    """write_model_dir writes its table with store.write_checksums: the weights and the
    vocabulary, each its sha256 computed here, indented as a checkpoint's table."""
    written = (model_dir / "checksums.json").read_bytes()
    table = {n: sha256(model_dir / n) for n in ("model.safetensors", "vocab.json", "merges.txt")}
    assert written == (json.dumps(table, indent=1) + "\n").encode()
    assert store.read_checksums(model_dir) == table
    assert store.verify_model_dir(model_dir) == table


def test_the_recorded_model_config_is_the_loaded_models(model_dir):
    assert store.model_config_of(model_dir) == store.load_model(model_dir).cfg


def export_table_from_before(model_dir: Path, tmp_path: Path) -> Path:
    """A copy of ``model_dir`` whose table is as exports wrote it before write_checksums
    wrote both: the weights only, on one line."""
    old = tmp_path / "old-export"
    shutil.copytree(model_dir, old)
    table = {"model.safetensors": sha256(old / "model.safetensors")}
    (old / "checksums.json").write_text(json.dumps(table) + "\n")
    return old


def test_an_export_table_from_before_is_verified(model_dir, tmp_path):
    from gpt.model import GPT

    old = export_table_from_before(model_dir, tmp_path)
    assert store.verify_model_dir(old) == {"model.safetensors": sha256(old / "model.safetensors")}
    loaded, original = store.load_model(old), GPT.from_pretrained(model_dir)
    for (name, a), b in zip(
        original.state_dict().items(), loaded.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    flip_last_byte(old / "model.safetensors")
    with pytest.raises(store.CheckpointError, match=r"model.safetensors: checksum mismatch"):
        store.verify_model_dir(old)
    with pytest.raises(ValueError, match=r"model.safetensors: checksum mismatch"):
        GPT.from_pretrained(old)


def test_an_export_table_naming_a_missing_or_altered_file_is_refused(model_dir, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    shutil.copy(copy / "vocab.json", copy / "merges.txt")  # another listed file's bytes
    with pytest.raises(store.CheckpointError, match=rf"{copy / 'merges.txt'}: checksum mismatch"):
        store.verify_model_dir(copy)
    shutil.copy(model_dir / "merges.txt", copy / "merges.txt")
    store.verify_model_dir(copy)
    flip_last_byte(copy / "merges.txt")  # not read to load the model, still listed: checked
    with pytest.raises(store.CheckpointError, match=rf"{copy / 'merges.txt'}: checksum mismatch"):
        store.verify_model_dir(copy)
    (copy / "merges.txt").unlink()
    with pytest.raises(store.CheckpointError, match=rf"{copy / 'merges.txt'}: missing \(listed in"):
        store.verify_model_dir(copy)


def checkpoint_table_from_before(model_dir: Path, tmp_path: Path) -> Path:
    """A checkpoint (of files a tool reads) whose table is as the trainer wrote it before
    sidecars were listed: every file but ``model/checksums.json``."""
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000007"
    shutil.copytree(model_dir, ckpt / "model")
    (ckpt / "trainer.json").write_text('{"step": 7}')
    names = sorted(
        str(p.relative_to(ckpt))
        for p in ckpt.rglob("*")
        if p.is_file() and p.name != "checksums.json"
    )
    table = {name: sha256(ckpt / name) for name in names}
    (ckpt / "checksums.json").write_text(json.dumps(table, indent=1) + "\n")
    (ckpt / "COMPLETE").write_text("step_00000007\n")
    return ckpt


def test_a_checkpoint_table_from_before_sidecars_is_verified(model_dir, tmp_path):
    ckpt = checkpoint_table_from_before(model_dir, tmp_path)
    assert "model/model.safetensors" in store.verify_checksums(ckpt)
    store.load_model(tmp_path / "run")  # the run's latest: this checkpoint
    flip_last_byte(ckpt / "trainer.json")
    with pytest.raises(store.CheckpointError, match=rf"{ckpt / 'trainer.json'}: checksum mismatch"):
        store.verify_checksums(ckpt)
    flip_last_byte(ckpt / "trainer.json")  # restored
    (ckpt / "model" / "notes.txt").write_text("x")
    with pytest.raises(store.CheckpointError, match=r"model/notes.txt: not listed in"):
        store.load_model(ckpt)


def test_a_checkpoint_table_from_before_still_checks_the_weights_it_lists(model_dir, tmp_path):
    ckpt = checkpoint_table_from_before(model_dir, tmp_path)
    weights = ckpt / "model" / "model.safetensors"
    flip_last_byte(weights)
    store.write_checksums(ckpt / "model", ["model.safetensors"])  # a sidecar made to agree
    with pytest.raises(store.CheckpointError, match=rf"{weights}: checksum mismatch"):
        store.load_model(ckpt)


def test_sampling_evaluation_and_export_import_neither_deepspeed_nor_the_trainer(model_dir):
    """Every module of the inference side (the sampling and evaluation CLIs, gpt.eval,
    gpt.convert, the loader), imported and then run on a model, loads no DeepSpeed and no
    trainer code."""
    code = f"""
import importlib, json, pkgutil, sys
import gpt.cli, gpt.convert, gpt.eval
names = ["gpt.store"]
cli = [m.name for m in pkgutil.iter_modules(gpt.cli.__path__) if m.name != "train"]
names += [f"gpt.cli.{{name}}" for name in cli]
for package in (gpt.eval, gpt.convert):
    names += [f"{{package.__name__}}.{{m.name}}" for m in pkgutil.iter_modules(package.__path__)]
for name in names:
    importlib.import_module(name)
from gpt.cli import sample
sample.main(["--ckpt", {str(model_dir)!r}, "--prompt", "a", "--max-new-tokens", "2"])
loaded = [m for m in sys.modules if m.split(".")[0] == "deepspeed" or m.startswith("gpt.train")]
print(json.dumps({{"imported": names, "loaded": sorted(loaded)}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("gpt.cli.sample", "gpt.eval.scoring", "gpt.eval.suite", "gpt.convert.__main__"):
        assert name in report["imported"]
    assert report["loaded"] == []
