"""Shared test set-up: Triton in the interpreter without a GPU, one thread count everywhere,
and the tiny byte-level corpus the trainer tests train on."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
THREADS = min(2, os.cpu_count() or 1)
torch.set_num_threads(THREADS)
# Subprocesses (train.py under torchrun, kill tests) must reduce with the same number of
# threads as in-process runs, or "bitwise equal" comparisons depend on the machine.
os.environ["OMP_NUM_THREADS"] = str(THREADS)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A prepared byte-level data set: 30 documents of random words, 20% validation."""
    from gpt.data.prepare import prepare

    root = tmp_path_factory.mktemp("corpus")
    docs = root / "docs"
    docs.mkdir()
    words = "the quick brown fox jumps over a lazy dog while the cat sat on the mat".split()
    g = torch.Generator().manual_seed(0)
    for i in range(30):
        picks = torch.randint(0, len(words), (150,), generator=g).tolist()
        (docs / f"doc{i:02d}.txt").write_text(" ".join(words[j] for j in picks))
    prepare([str(docs)], root / "bytes", encoding="bytes", val_fraction=0.2, progress=False)
    return root / "bytes"


@pytest.fixture(autouse=True)
def same_thread_count():
    """Every test starts with THREADS threads, whatever an earlier one set (a benchmark's
    --threads): in-process and subprocess runs must reduce alike to be bitwise equal."""
    torch.set_num_threads(THREADS)
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small random byte-level model directory (GPT.save_pretrained with its tokenizer)."""
    from gpt import GPT, ModelConfig

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=257, block_size=32, n_layer=2, n_head=4, n_embd=32))
    path = tmp_path_factory.mktemp("export") / "model"
    model.save_pretrained(path, tokenizer="bytes")
    return path


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib Figure saved while the test runs, in order: a plot test checks what
    is drawn (curves, labels, titles, legend entries), not the PNG's magic bytes."""
    from matplotlib.figure import Figure

    saved = []
    real = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        saved.append(self)
        return real(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


@pytest.fixture(scope="session")
def twenty(tmp_path_factory, data_dir):
    """A 20-step run with checkpoints at 10 and 20 (trained once per session)."""
    from runs import config

    from gpt.cli import train

    path, out = config(tmp_path_factory.mktemp("twenty"), data_dir)
    args = [
        str(path),
        "--train.max_steps=20",
        "--train.ckpt_interval=10",
        "--train.eval_interval=0",
    ]
    assert train.main(args) == 0
    return out


@pytest.fixture
def trained(tmp_path, data_dir, twenty):
    """A copy of ``twenty`` to damage or train on: (config path, run directory)."""
    import shutil

    from runs import config

    path, out = config(tmp_path, data_dir)
    shutil.copytree(twenty, out)
    return path, out
