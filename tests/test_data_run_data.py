"""gpt/data/run_data.py: the manifests of a run's data sets by role, and the config checked
against them (on hand-made manifests, and end to end through train.py's exit status)."""

import pytest

from gpt.cli import train
from gpt.config import ConfigError
from gpt.config_io import load_config
from gpt.data.prepare import prepare
from gpt.data.run_data import check_run_data, read_manifests
from gpt.data.shards import read_manifest


def write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def manifest(n_vocab=257, train=100, val=100):
    return {"encoding": "bytes", "n_vocab": n_vocab,
            "splits": {"train": {"tokens": train}, "val": {"tokens": val}}}  # fmt: skip


def test_data_that_fits_passes():
    cfg = load_config(None, ["--model.vocab_size=257", "--model.block_size=16"])
    check_run_data(cfg, {"train": manifest(train=17, val=17)})  # one sequence each is enough


@pytest.mark.parametrize(
    "args, manifests, message",
    [
        (["--model.vocab_size=100"], {"train": manifest()},
         "data.dir = out/data/shakespeare uses bytes with 257 tokens, more than "
         "model.vocab_size = 100"),
        ([], {"train": manifest(train=16)},
         "data.dir = out/data/shakespeare: split 'train' has 16 tokens, fewer than one sequence "
         "of model.block_size + 1 = 17; prepare more data (or a smaller model.block_size)"),
        ([], {"train": manifest(val=0)},
         "split 'val' has 0 tokens, fewer than one sequence of model.block_size + 1 = 17; set "
         "train.eval_interval = 0 or prepare more data"),
        (['--finetune.replay_dir="r"'], {"train": manifest(), "replay": manifest(train=3)},
         "finetune.replay_dir = r: split 'train' has 3 tokens"),
        (['--data.extra_val={law = "l"}'], {"train": manifest(), "extra_val/law": manifest(val=2)},
         "data.extra_val.law = l: split 'val' has 2 tokens"),
        (['--data.extra_val={law = "l"}'],
         {"train": manifest(), "extra_val/law": manifest(n_vocab=50304)},
         "data.extra_val.law = l uses bytes with 50304 tokens"),
    ],
)  # fmt: skip
def test_data_the_run_cannot_use_is_refused_naming_the_key(args, manifests, message):
    cfg = load_config(None, ["--model.vocab_size=257", "--model.block_size=16", *args])
    with pytest.raises(ConfigError) as err:
        check_run_data(cfg, manifests)
    assert message in str(err.value)


def test_without_evaluation_only_the_training_splits_are_needed():
    args = ['--data.extra_val={law = "l"}', '--finetune.replay_dir="r"']
    cfg = load_config(None, ["--model.block_size=16", "--train.eval_interval=0", *args])
    empty_val = manifest(val=0)
    check_run_data(cfg, {"train": empty_val, "replay": manifest(val=0), "extra_val/law": empty_val})


def test_an_unreadable_data_set_is_named_by_its_key(tmp_path):
    cfg = load_config(None, [f'--data.extra_val={{law = "{tmp_path / "none"}"}}'])
    cfg.data.dir = str(tmp_path / "none")
    with pytest.raises(ConfigError, match=r"^data.dir: data directory .*none does not exist"):
        read_manifests(cfg)


def test_evaluation_on_an_empty_validation_split_is_refused(tmp_path, capsys):

    (tmp_path / "doc.txt").write_text("a small corpus with no validation split " * 20)
    prepare([str(tmp_path / "doc.txt")], tmp_path / "d", encoding="bytes", val_fraction=0.0,
            progress=False)  # fmt: skip
    path = write(tmp_path, f'[data]\ndir = "{tmp_path / "d"}"\n[model]\nvocab_size = 257\n'
                 "block_size = 16\n")  # fmt: skip
    assert train.main([str(path), f"--train.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "split 'val' has 0 tokens" in err and "set train.eval_interval = 0" in err


def test_extra_val_sets_cannot_replace_the_training_sets_manifests(tmp_path, data_dir):
    """read_manifests keys the extra sets by a role of their own: even unvalidated, an extra
    set named "train" or "replay" does not replace data.dir's or the replay set's manifest."""

    (tmp_path / "other.txt").write_text("another corpus entirely " * 40)
    other = tmp_path / "other"
    prepare([str(tmp_path / "other.txt")], other, "bytes", 0.5, progress=False)
    cfg = load_config(
        None,
        [
            f'--data.dir="{data_dir}"',
            f'--finetune.replay_dir="{data_dir}"',
            f'--data.extra_val={{train = "{other}", replay = "{other}", val = "{other}"}}',
        ],
    )
    manifests = read_manifests(cfg)
    assert manifests["train"] == manifests["replay"] == read_manifest(data_dir)
    for name in ("train", "replay", "val"):
        assert manifests[f"extra_val/{name}"] == read_manifest(other)
