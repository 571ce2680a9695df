"""python -m gpt.eval.passkey (gpt/eval/passkey.py): the grader, the grid on a tiny random
model and on a stand-in that answers by reading the prompt, the JSON and heat map, and every
refusal naming its flag."""

import json
import re

import pytest
import torch

from gpt import GPT, ModelConfig, store
from gpt.data.passkey import shortest_length
from gpt.data.tokenizer import get_tokenizer
from gpt.eval import passkey
from gpt.eval.passkey import grade, plot_heat_map, run_grid

PROG = "python -m gpt.eval.passkey"
BYTES_SHORTEST = shortest_length(get_tokenizer("bytes"))  # 103


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory):
    """A random byte-level model that runs 160 positions: room for passkey prompts."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=257, block_size=160, n_layer=2, n_head=2, n_embd=32))
    path = tmp_path_factory.mktemp("passkey") / "model"
    model.save_pretrained(path, tokenizer="bytes")
    return path


def run(capsys, *argv):
    try:
        code = passkey.main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "output, right",
    [
        (" 12345.", True),
        ("12345", True),
        ("\n 12345 is the pass key", True),
        (" 12345 6", True),  # the digits end at the space
        (" 1234", False),  # a prefix
        (" 1234.", False),
        (" 123456", False),  # a longer number
        (" 12346", False),
        (" 2345", False),
        ("a 12345", False),  # not leading
        (" twelve", False),
        ("", False),
        (" 12 345", False),
    ],
)
def test_grade_is_exact_match_of_the_leading_digits(output, right):
    assert grade(output, "12345") is right


def answer_from_prompt(tokenizer, only_first=False):
    """A stand-in for gpt.generate.generate that answers by reading the key from the prompt
    (with ``only_first``, only when the key comes first; else "00000"): what a perfect
    model would say."""

    def generate(model, idx, new, **kwargs):
        rows = []
        for row in idx.tolist():
            text = tokenizer.decode(row)
            key = re.search(r"The pass key is (\d+)\.", text)[1]
            right = not only_first or text.startswith("The pass key is")
            answer = tokenizer.encode(f" {key if right else '00000'}.")
            assert len(answer) == new, "the grader generates exactly the answer's tokens"
            rows.append(row + answer)
        return torch.tensor(rows)

    return generate


def test_a_model_that_reads_the_key_scores_every_cell(monkeypatch, long_model_dir):
    tokenizer = get_tokenizer("bytes")
    monkeypatch.setattr(passkey, "generate", answer_from_prompt(tokenizer))
    model = store.load_model(long_model_dir)
    cells = run_grid(model, tokenizer, [120, 140], [0.0, 0.5, 1.0], 12, seed=3, batch_size=5,
                     progress=False)  # fmt: skip
    assert [(c["length"], c["depth"]) for c in cells] == [
        (n, d) for n in (120, 140) for d in (0.0, 0.5, 1.0)
    ]
    for c in cells:
        assert c["trials"] == 12 == len(c["records"]) and c["accuracy"] == 1.0
        assert len({r["key"] for r in c["records"]}) == 12
        assert all(r["prompt_tokens"] <= c["length"] for r in c["records"])


def test_cli_on_a_random_model_writes_the_grid_and_draws_the_heat_map(
    capsys, long_model_dir, tmp_path, saved_figures
):
    out = tmp_path / "res" / "passkey.json"
    code, stdout, err = run(capsys, "--ckpt", long_model_dir, "--lengths", 110, 150, "--depths",
                            0, 0.5, 1, "--trials", 10, "--out", out)  # fmt: skip
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["config"]["lengths"] == [110, 150]
    assert report["config"]["depths"] == [0.0, 0.5, 1.0]
    assert report["config"]["trials"] == 10 and report["config"]["tokenizer"] == "bytes"
    assert [(c["length"], c["depth"]) for c in report["cells"]] == [
        (n, d) for n in (110, 150) for d in (0.0, 0.5, 1.0)
    ]
    for cell in report["cells"]:
        records = cell["records"]
        assert cell["trials"] == len(records) == 10 and len({r["key"] for r in records}) == 10
        assert all(r["correct"] == grade(r["output"], r["key"]) for r in records)
        assert cell["accuracy"] == sum(r["correct"] for r in records) / 10
    grid = [[c["accuracy"] for c in report["cells"][i * 3 : i * 3 + 3]] for i in range(2)]
    assert report["accuracy"] == grid
    assert "length \\ depth" in stdout and "6 cells x 10 trials" in stdout
    # the heat map, beside --out
    assert out.with_suffix(".png").is_file()
    (fig,) = saved_figures
    ax = fig.axes[0]
    assert ax.get_images()[0].get_array().tolist() == grid
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.5", "1"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["110", "150"]
    assert "depth" in ax.get_xlabel() and "length" in ax.get_ylabel()
    assert "10 trials per cell" in ax.get_title()


def test_heat_map_rows_are_lengths_and_columns_depths(monkeypatch, long_model_dir, tmp_path,
                                                       saved_figures):  # fmt: skip
    """With a stand-in right only at depth 0, the heat map's first column alone is 100%."""
    tokenizer = get_tokenizer("bytes")
    monkeypatch.setattr(passkey, "generate", answer_from_prompt(tokenizer, only_first=True))
    model = store.load_model(long_model_dir)
    lengths, depths = [150, 160], [0.0, 0.5, 1.0]  # 2 filler sentences each
    cells = run_grid(model, tokenizer, lengths, depths, 10, seed=0, progress=False)
    plot_heat_map(cells, lengths, depths, tmp_path / "h.png")
    image = saved_figures[0].axes[0].get_images()[0].get_array().tolist()
    assert image == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    texts = [t.get_text() for t in saved_figures[0].axes[0].texts]
    assert texts == ["100", "0", "0", "100", "0", "0"]


def test_default_lengths_are_what_the_model_runs(capsys, long_model_dir, tmp_path):
    out = tmp_path / "p.json"
    code, _, err = run(capsys, "--ckpt", long_model_dir, "--trials", 1, "--depths", 0.5,
                       "--out", out)  # fmt: skip
    assert code == 0, err
    assert json.loads(out.read_text())["config"]["lengths"] == [160]  # 80 < 103, the shortest


@pytest.mark.parametrize(
    "args, said",
    [
        (["--lengths", 161], "--lengths 161: longer than the model runs (block_size 160); "
                             f"valid: {BYTES_SHORTEST} to 160"),
        (["--lengths", 102], f"--lengths 102: shorter than the shortest passkey prompt and "
                            f"answer ({BYTES_SHORTEST} tokens of 'bytes')"),
        (["--lengths", 120, 120], "--lengths lists a length twice"),
        (["--depths", 1.5], "--depths must be in [0, 1], got 1.5"),
        (["--depths", 0.5, 0.5], "--depths lists a depth twice"),
        (["--trials", 0], "--trials must be >= 1, got 0"),
        (["--batch-size", 0], "--batch-size must be >= 1, got 0"),
        (["--out", "."], "--out . is a directory"),
    ],
)  # fmt: skip
def test_refusals_name_the_flag(capsys, long_model_dir, args, said):
    code, out, err = run(capsys, "--ckpt", long_model_dir, *args)
    assert code == 2
    assert said in err and out == ""


@pytest.mark.parametrize("flags", [[], ["--block-size", 1]])
def test_a_model_shorter_than_any_prompt_says_so(capsys, tmp_path, flags):
    """No length is valid: said as such, not as "--lengths 16: ... valid: 103 to 16" (a
    range that is empty, about a flag not given)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, block_size=16, n_layer=1, n_head=2, n_embd=16,
                      position_encoding="rope")  # fmt: skip
    GPT(cfg).save_pretrained(tmp_path / "short", tokenizer="bytes")
    code, out, err = run(capsys, "--ckpt", tmp_path / "short", *flags)
    runs = flags[-1] if flags else 16
    assert code == 2 and out == ""
    assert (
        f"error: the model runs at most {runs} positions (block_size {runs}), fewer than the "
        f"shortest passkey prompt and answer ({BYTES_SHORTEST} tokens of 'bytes')"
    ) in err
    assert "--lengths" not in err and "valid:" not in err
