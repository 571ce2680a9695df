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
