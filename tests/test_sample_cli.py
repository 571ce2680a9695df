"""sample.py end to end, in process: every kind of --ckpt path, generation, few-shot prompts,
attention maps, and every error path (status 2, `sample.py: error: ...`). Evaluation, and
`sample.py --eval` forwarding to it: test_evaluate_cli.py."""

import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers

from gpt import GPT, ModelConfig, store
from gpt.cli import sample
from gpt.data.tokenizer import get_tokenizer

transformers.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parents[1]
BYTES = get_tokenizer("bytes")


def run(capsys, *argv, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = 0
    try:
        sample.main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def greedy(capsys, ckpt, *extra):
    code, out, err = run(capsys, "--ckpt", ckpt, "--prompt", "ab", "--temperature", "0",
                         "--max-new-tokens", "12", *extra)  # fmt: skip
    assert code == 0, err
    return out


def test_run_dir_checkpoint_and_model_dir_give_the_same_text(capsys, model_dir, tmp_path):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    for step, complete in ((10, True), (20, True), (30, False)):
        ckpt = ckpts / f"step_{step:08d}"
        shutil.copytree(model_dir, ckpt / "model")
        if complete:
            (ckpt / "COMPLETE").write_text(ckpt.name + "\n")
    (ckpts / "latest").write_text("step_00000020")
    with torch.no_grad():  # make step 20 differ from the others
        model = GPT.from_pretrained(model_dir)
        model.transformer.wte.weight.mul_(-1.0)
        model.save_pretrained(ckpts / "step_00000020" / "model", tokenizer="bytes")
    for step in (10, 20):  # the table every checkpoint the trainer writes has
        store.write_checksums(ckpts / f"step_{step:08d}")
    expected = greedy(capsys, ckpts / "step_00000020" / "model")
    assert greedy(capsys, run_dir) == expected
    assert greedy(capsys, ckpts / "step_00000020") == expected
    assert greedy(capsys, model_dir) != expected
    assert expected.startswith("ab") and len(expected) > 3


def test_hugging_face_directory_greedy_equals_transformers(capsys, tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=260, n_positions=40, n_embd=32, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4.0)
    hf.save_pretrained(tmp_path / "hf")
    prompt = torch.tensor([BYTES.encode("Hi")])
    ids = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                      do_sample=False, eos_token_id=None, pad_token_id=0)[0].tolist()  # fmt: skip
    code, out, err = run(capsys, "--ckpt", tmp_path / "hf", "--tokenizer", "bytes", "--prompt",
                         "Hi", "--temperature", "0", "--max-new-tokens", "10")  # fmt: skip
    assert code == 0, err
    assert out == BYTES.decode(ids) + "\n"


def test_samples_seeds_and_stop_strings(capsys, model_dir):
    args = ("--ckpt", model_dir, "--prompt", "x", "--num-samples", "3", "--max-new-tokens", "15",
            "--top-k", "20", "--top-p", "0.95", "--seed")  # fmt: skip
    code, out, _ = run(capsys, *args, "1")
    assert code == 0 and out.count("-" * 40) == 2
    assert run(capsys, *args, "1")[1] == out
    assert run(capsys, *args, "2")[1] != out
    first = out.split("\n" + "-" * 40 + "\n")[0]
    stop = first[4:6]
    code, cut, _ = run(capsys, *args, "1", "--stop", stop)
    assert cut.split("\n" + "-" * 40 + "\n")[0] == first[: first.find(stop, 1)]


def test_empty_stdin_prompt_file_and_long_prompt(capsys, model_dir, tmp_path, monkeypatch):
    code, out, _ = run(capsys, "--ckpt", model_dir, "--max-new-tokens", "3", "--temperature", "0",
                       stdin="", monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0 and out.startswith("<|endoftext|>")
    code, out, _ = run(capsys, "--ckpt", model_dir, "--max-new-tokens", "2", stdin="piped",
                       monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0 and out.startswith("piped")
    (tmp_path / "p.txt").write_text("from a file")
    code, out, _ = run(capsys, "--ckpt", model_dir, "--prompt-file", tmp_path / "p.txt",
                       "--max-new-tokens", "2")  # fmt: skip
    assert code == 0 and out.startswith("from a file")
    digits = "0123456789" * 4
    code, out, err = run(capsys, "--ckpt", model_dir, "--prompt", digits, "--max-new-tokens",
                         "40", "--temperature", "0")  # fmt: skip
    assert code == 0 and "warning: the prompt has 40 tokens" in err and "keeping its last 31" in err
    assert out.startswith(digits[-31:]) and not out.startswith(digits[-32:])


def write_task(path: Path) -> Path:
    rows = [{"input": f"{i}+{i}", "choices": [str(2 * i), str(2 * i + 1)], "answer": 0}
            for i in range(6)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_task_prompt_is_shown_exactly(capsys, model_dir, tmp_path):
    task = write_task(tmp_path / "add.jsonl")
    args = ("--task", task, "--example", "2", "--shots", "2", "--max-new-tokens", "1")
    code, out, _ = run(
        capsys, "--ckpt", model_dir, *args, "--show-prompt", "--separator", "\\n--\\n"
    )
    assert code == 0
    prompt = out.split("===== prompt =====\n")[1].split("\n===== end of prompt =====")[0]
    demos, query = prompt.rsplit("\n--\n", 1)
    assert query == "Q: 2+2\nA: " and demos.count("Q: ") == 2 and "2+2" not in demos
    code, out2, _ = run(capsys, "--ckpt", model_dir, "--task", task, "--prompt", "9+9", "--shots",
                        "1", "--show-prompt", "--max-new-tokens", "1")  # fmt: skip
    assert out2.split("===== end of prompt =====")[0].endswith("Q: 9+9\nA: \n")


def test_device_cuda_without_cuda_is_a_message(capsys, model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(capsys, "--ckpt", model_dir, "--prompt", "a", "--device", "cuda")
    assert code == 2 and "--device cuda: CUDA is not available here" in err
    assert "Traceback" not in err
    code, _, err = run(capsys, "--ckpt", model_dir, "--prompt", "a", "--device", "tpu9")
    assert code == 2 and "--device 'tpu9' is not a device" in err


def test_padded_vocabulary_samples_with_the_bytes_tokenizer(capsys, tmp_path):
    """A 300-token model (padded past bytes' 257) whose padding ids are the most likely:
    sampling never draws them, so the bytes tokenizer can decode everything (evaluation:
    test_evaluate_cli.py)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        model.transformer.wte.weight[257:] = model.transformer.wte.weight[:43] * 40.0
    model.save_pretrained(tmp_path / "m", tokenizer="bytes")
    for temperature in ("0", "1.0"):
        flags = ("--tokenizer", "bytes", "--temperature", temperature, "--max-new-tokens", "20")
        code, out, err = run(capsys, "--ckpt", tmp_path / "m", "--prompt", "ab", *flags)
        assert code == 0, err


def test_attention_map_draws_every_head_with_its_weights(
    capsys, model_dir, tmp_path, saved_figures
):
    """A grid of 2 layers x 4 heads, each panel the head's weights (the same model's,
    computed directly), queries labelled down the first column, keys along the bottom row."""
    from gpt.eval.attention_map import attention_weights

    png = tmp_path / "maps" / "attn.png"
    code, out, _ = run(capsys, "--ckpt", model_dir, "--prompt", "Hello", "--attention-map", png,
                       "--attention", "sdpa")  # fmt: skip
    assert code == 0 and "2 layers x 4 heads" in out and png.is_file()
    (fig,) = saved_figures
    assert fig._suptitle.get_text() == f"{model_dir}: 5 tokens"
    model = GPT.from_pretrained(model_dir, attention="sdpa")
    weights = attention_weights(model, torch.tensor([BYTES.encode("Hello")]))
    assert len(fig.axes) == 2 * 4
    for i, ax in enumerate(fig.axes):
        layer, head = divmod(i, 4)
        assert ax.get_title() == f"layer {layer} head {head}"
        (image,) = ax.get_images()
        torch.testing.assert_close(torch.as_tensor(image.get_array()), weights[layer][head])
        ys = [t.get_text() for t in ax.get_yticklabels()]
        xs = [t.get_text() for t in ax.get_xticklabels()]
        assert ys == (list("Hello") if head == 0 else [])
        assert xs == (list("Hello") if layer == 1 else [])


def test_attention_map_weights_are_causal_rows_summing_to_one(model_dir):
    from gpt.eval.attention_map import attention_weights

    model = GPT.from_pretrained(model_dir, attention="sdpa")
    weights = attention_weights(model, torch.tensor([BYTES.encode("Hello")]))
    assert len(weights) == 2 and weights[0].shape == (4, 5, 5)
    for w in weights:
        assert torch.allclose(w.sum(-1), torch.ones(4, 5))
        assert (w.triu(1) == 0).all()
    assert model.transformer.h[0].attn.attend.__name__ == "sdpa_attention"  # restored


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
        (["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
        (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["--top-k", "0"], "--top-k must be an integer >= 1"),
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--max-new-tokens", "-2"], "--max-new-tokens must be >= 0"),
        (["--shots", "-1"], "--shots must be >= 0"),
        (["--shots", "1", "2"], "unrecognized arguments: 2$"),  # a prompt has one count
        # evaluation's flags are python -m gpt.eval's (test_evaluate_cli.py)
        (["--out", "r.json"], "unrecognized arguments: --out r.json$"),
        (["--limit", "0"], "unrecognized arguments: --limit 0$"),
        (["--batch-size", "0"], "unrecognized arguments: --batch-size 0$"),
        (["--window-keep", "33"], r"--window-keep must be in \[1, block_size = 32\]"),
        (["--attention", "nope"], "unknown attention backend 'nope'; valid names: naive"),
        (["--example", "1"], "--example needs --task"),
        (["--tokenizer", "nope"], "unknown encoding 'nope'; valid: gpt2"),
        (["--prompt-file", "missing.txt"], "--prompt-file missing.txt: no such file"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(capsys, model_dir, argv, match, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "--ckpt", model_dir, "--prompt", "a", *argv)
    if "--prompt-file" in argv:  # --prompt and --prompt-file exclude each other
        code, _, err = run(capsys, "--ckpt", model_dir, *argv)
    assert code == 2
    assert "sample.py: error: " in err
    assert re.search(match, err), err


def test_example_without_task_is_refused_with_or_without_a_prompt(capsys, model_dir):
    for argv in (["--example", "1"], ["--example", "1", "--prompt", "a"]):
        code, out, err = run(capsys, "--ckpt", model_dir, *argv)
        assert code == 2 and out == "", argv
        assert "sample.py: error: --example needs --task (and no --prompt" in err, err


def test_path_and_file_errors_exit_2(capsys, model_dir, tmp_path):
    (tmp_path / "run" / "checkpoints" / "step_00000005.tmp").mkdir(parents=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n{"input": "c"}\n')
    task = write_task(tmp_path / "add.jsonl")
    cases = [
        (["--ckpt", tmp_path / "nowhere"], "not a model directory"),
        (["--ckpt", tmp_path / "run"], "the run has no complete checkpoint yet"),
        (["--ckpt", model_dir, "--task", bad], r"bad\.jsonl, line 2"),
        (["--ckpt", model_dir, "--task", task, "--example", "6"], "--example 6 is out of range"),
        (["--ckpt", model_dir, "--task", task, "--shots", "6"], "--shots 6 needs 6 examples"),
        (["--ckpt", model_dir, "--task", task, "--template", "Q"], r"--template must contain"),
    ]
    for argv, match in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.startswith("sample.py: error: ")
        assert re.search(match, err), (argv, err)


def test_tokenizer_larger_than_the_vocabulary_is_refused(capsys, tmp_path):
    torch.manual_seed(0)
    GPT(ModelConfig(vocab_size=100, block_size=8, n_layer=1, n_head=1, n_embd=8)).save_pretrained(
        tmp_path / "m", tokenizer="bytes"
    )
    code, _, err = run(capsys, "--ckpt", tmp_path / "m", "--prompt", "a")
    assert code == 2 and "tokenizer 'bytes' has 257 tokens but the model" in err


def test_recorded_backend_is_used_and_an_unusable_one_falls_back_to_sdpa(
    capsys, model_dir, tmp_path, monkeypatch
):
    from gpt import attention

    def unusable():
        raise attention.BackendUnavailable("it needs hardware this machine lacks")

    monkeypatch.setitem(attention._LOADERS, "fancy", unusable)
    shutil.copytree(model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["gpt_config"]["attention"] = "fancy"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    out = greedy(capsys, tmp_path / "m")
    assert out == greedy(capsys, model_dir)
    _, _, err = run(capsys, "--ckpt", tmp_path / "m", "--prompt", "a", "--max-new-tokens", "1")
    assert "warning: attention backend 'fancy' is unavailable here: it needs hardware" in err
    assert "using sdpa" in err


def test_files_in_the_wrong_encoding_are_one_line_errors_naming_the_file(
    capsys, model_dir, tmp_path, monkeypatch
):
    latin1, utf16 = tmp_path / "latin1.txt", tmp_path / "utf16.txt"
    latin1.write_bytes("café au lait".encode("latin-1"))
    utf16.write_bytes("café".encode("utf-16"))
    task = tmp_path / "task.jsonl"
    task.write_bytes(b'{"input": "a", "target": "b"}\n{"input": "caf\xe9", "target": "b"}\n')
    cases = [
        (["--prompt-file", latin1], f"--prompt-file {latin1}: not UTF-8 text: byte 0xe9 at line "
         "1 (offset 3): invalid continuation byte; prompt files must be UTF-8: convert it, e.g. "
         "iconv -f latin1 -t utf-8"),
        (["--prompt-file", utf16], f"--prompt-file {utf16}: not UTF-8 text (it looks like "
         "UTF-16): byte 0xff at line 1 (offset 0)"),
        (["--task", task], f"{task}: not UTF-8 text: byte 0xe9 at line 2 (offset 44)"),
    ]  # fmt: skip
    for argv, message in cases:
        code, out, err = run(capsys, "--ckpt", model_dir, "--max-new-tokens", "1", *argv)
        assert code == 2 and err.startswith(f"sample.py: error: {message}"), err
        assert err.count("\n") == 1 and out == ""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe a prompt")))
    code, _, err = run(capsys, "--ckpt", model_dir, "--max-new-tokens", "1")
    assert code == 2 and err.startswith(
        "sample.py: error: stdin: not UTF-8 text (it looks like UTF-16): byte 0xff at line 1"
    ), err
