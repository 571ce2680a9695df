"""sample.py end to end, in process: every kind of --ckpt path, generation, few-shot prompts,
evaluation, attention maps, and every error path (status 2, `sample.py: error: ...`)."""

import io
import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from deadline import deadline

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


def test_eval_writes_results_json(capsys, model_dir, tmp_path):
    task = write_task(tmp_path / "add.jsonl")
    out_file = tmp_path / "res" / "results.json"
    code, out, _ = run(capsys, "--ckpt", model_dir, "--eval", task, "--shots", "2", "--limit", "4",
                       "--batch-size", "3", "--out", out_file)  # fmt: skip
    assert code == 0
    report = json.loads(out_file.read_text())
    (results,) = report["results"]
    assert results["examples"] == 4 and len(results["records"]) == 4
    assert all(len(r["logprobs"]) == 2 for r in results["records"])
    assert report["config"]["limit"] == 4 and results["shots"] == 2 and report["skipped"] == []
    # the grade is the mean score of each record's most likely choice, recomputed here
    grade = sum(r["scores"][max(range(2), key=r["logprobs"].__getitem__)]
                for r in results["records"]) / 4  # fmt: skip
    assert results["metrics"]["multiple_choice_grade"] == pytest.approx(grade)
    row = next(line for line in out.splitlines() if line.startswith("add "))
    assert row.split() == ["add", "multiple_choice", "2", "4", "multiple_choice_grade",
                           f"{100 * grade:.1f}%", "50.0%"]  # fmt: skip


def write_suite(root: Path) -> Path:
    """A BIG-bench-like tree: a container with two subtasks (one with empty inputs and
    several right choices, one generative with list targets and a custom separator), a task
    with only unimplemented metrics and one with too few examples for 2 shots."""

    def task(path, data):
        path.mkdir(parents=True, exist_ok=True)
        (path / "task.json").write_text(json.dumps(data))

    task(root / "parent", {"name": "parent", "metrics": ["multiple_choice_grade"]})
    task(root / "parent" / "empty", {
        "metrics": ["multiple_choice_grade"], "task_prefix": "Pick.\n",
        "examples": [{"input": "", "target_scores": {f"a{i}": 1, f"b{i}": 1, f"c{i}": 0.5}}
                     for i in range(5)],
    })  # fmt: skip
    task(root / "parent" / "gen", {
        "metrics": ["exact_str_match"], "few_shot_example_separator": "\n--\n",
        "stop_string": "\n",
        "examples": [{"input": f"{i}+{i}", "target": [str(2 * i), f"{2 * i}."]} for i in range(4)],
    })  # fmt: skip
    task(root / "bleu", {"metrics": ["bleu", "rouge"],
                         "examples": [{"input": "a", "target": "b"}] * 3})  # fmt: skip
    two = [{"input": "q", "target_scores": {"x": 1, "y": 0}},
           {"input": "r", "target_scores": {"x": 0, "y": 1}}]  # fmt: skip
    task(root / "small", {"metrics": ["multiple_choice_grade"], "examples": two})
    return root


def test_suite_of_tasks_at_several_shots_is_deterministic(capsys, model_dir, tmp_path):
    root = write_suite(tmp_path / "suite")
    outs = [tmp_path / "a" / "r.json", tmp_path / "b" / "r.json"]
    for out_file in outs:
        code, out, err = run(capsys, "--ckpt", model_dir, "--eval", root, "--shots", "0", "2",
                             "--out", out_file)  # fmt: skip
        assert code == 0, err
    assert outs[0].read_bytes() == outs[1].read_bytes()  # two identical runs, identical JSON
    assert (tmp_path / "a" / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # beside --out
    report = json.loads(outs[0].read_text())
    runs = [(r["task"], r["shots"]) for r in report["results"]]
    assert runs == [("parent:empty", 0), ("parent:empty", 2), ("parent:gen", 0), ("parent:gen", 2)]
    skipped = {s["task"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"parent", "bleu", "small"}
    assert skipped["parent"].startswith("a container task without examples")
    assert "metrics (bleu, rouge) are not implemented" in skipped["bleu"]
    assert skipped["small"].startswith("--shots 2 needs 2 examples besides the query")
    assert "skipped small: --shots 2 needs 2" in out and "2 tasks x 2 shot counts" in out
    empty = report["results"][1]
    assert empty["chance"] == pytest.approx(2.5 / 3)  # (1 + 1 + 0.5) / 3 for every example
    for r in empty["records"]:  # any right choice scores 1, the fractional one 0.5
        assert r["scores"][r["predicted"]] == {0: 1.0, 1: 1.0, 2: 0.5}[r["predicted"]]


def test_eval_output_that_cannot_be_written_is_refused_before_any_work(capsys, model_dir, tmp_path):
    task = write_task(tmp_path / "add.jsonl")
    (tmp_path / "a_file").write_text("")
    for out, match in [(tmp_path, "is a directory"), (tmp_path / "a_file" / "r.json", "is a file")]:
        code, stdout, err = run(capsys, "--ckpt", model_dir, "--eval", task, "--out", out)
        assert code == 2 and f"--out {out}" in err and match in err, err
        assert stdout == ""  # nothing evaluated
    code, _, err = run(capsys, "--ckpt", model_dir, "--eval", task, "--plot", tmp_path)
    assert code == 2 and "--plot" in err and "is a directory" in err


def test_device_cuda_without_cuda_is_a_message(capsys, model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(capsys, "--ckpt", model_dir, "--prompt", "a", "--device", "cuda")
    assert code == 2 and "--device cuda: CUDA is not available here" in err
    assert "Traceback" not in err
    code, _, err = run(capsys, "--ckpt", model_dir, "--prompt", "a", "--device", "tpu9")
    assert code == 2 and "--device 'tpu9' is not a device" in err


def test_padded_vocabulary_samples_and_evaluates_with_the_bytes_tokenizer(capsys, tmp_path):
    """A 300-token model (padded past bytes' 257) whose padding ids are the most likely:
    sampling and evaluation never draw them, so the bytes tokenizer can decode everything."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        model.transformer.wte.weight[257:] = model.transformer.wte.weight[:43] * 40.0
    model.save_pretrained(tmp_path / "m", tokenizer="bytes")
    for temperature in ("0", "1.0"):
        flags = ("--tokenizer", "bytes", "--temperature", temperature, "--max-new-tokens", "20")
        code, out, err = run(capsys, "--ckpt", tmp_path / "m", "--prompt", "ab", *flags)
        assert code == 0, err
    rows = [{"input": "a", "target": "b"}, {"input": "c", "target": "d"}]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run(capsys, "--ckpt", tmp_path / "m", "--eval", tmp_path / "g.jsonl",
                         "--tokenizer", "bytes", "--shots", "1")  # fmt: skip
    assert code == 0, err


def test_attention_map_png(capsys, model_dir, tmp_path):
    png = tmp_path / "maps" / "attn.png"
    code, out, _ = run(capsys, "--ckpt", model_dir, "--prompt", "Hello", "--attention-map", png,
                       "--attention", "sdpa")  # fmt: skip
    assert code == 0 and "2 layers x 4 heads" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
        (["--shots", "1", "2"], "several --shots counts need --eval"),
        (["--eval", "t.jsonl", "--shots", "1", "1"], "--shots lists a count twice"),
        (["--out", "r.json"], "--out and --plot go with --eval"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--window-keep", "33"], r"--window-keep must be in \[1, block_size = 32\]"),
        (["--attention", "nope"], "unknown attention backend 'nope'; valid names: naive"),
        (["--example", "1"], "--example needs --task"),
        (["--eval", "t.jsonl", "--task", "t.jsonl"], "--eval cannot be combined with --task"),
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


def test_path_and_file_errors_exit_2(capsys, model_dir, tmp_path):
    (tmp_path / "run" / "checkpoints" / "step_00000005.tmp").mkdir(parents=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n{"input": "c"}\n')
    task = write_task(tmp_path / "add.jsonl")
    cases = [
        (["--ckpt", tmp_path / "nowhere"], "not a model directory"),
        (["--ckpt", tmp_path / "run"], "the run has no complete checkpoint yet"),
        (["--ckpt", model_dir, "--eval", bad], r"bad\.jsonl, line 2: needs \"target\""),
        (["--ckpt", model_dir, "--task", bad], r"bad\.jsonl, line 2"),
        (["--ckpt", model_dir, "--task", task, "--example", "6"], "--example 6 is out of range"),
        (["--ckpt", model_dir, "--eval", task, "--shots", "6"], "--shots 6 needs 6 examples"),
        (["--ckpt", model_dir, "--eval", task, "--template", "Q"], r"--template must contain"),
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


def strict_json(path: Path):
    """The file as RFC 8259 JSON: NaN, Infinity and -Infinity are refused."""

    def refuse(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_eval_suite_skips_bad_tasks_and_always_writes_standard_json(
    capsys, model_dir, tmp_path, monkeypatch
):
    """A NaN score once ended the whole suite (IndexError), a non-UTF-8 file too; now each is
    one skipped line with its reason, the summary counts them, and --out is standard JSON,
    a non-finite number computed on the way (here a NaN log-likelihood) written as null
    with a note."""
    root = tmp_path / "suite"
    root.mkdir()
    write_task(root / "add.jsonl")
    (root / "nan").mkdir()
    nan = [{"input": f"q{i}", "target_scores": {"x": "NaN" if i else 0, "y": 1}} for i in range(3)]
    (root / "nan" / "task.json").write_text(json.dumps({"examples": nan}).replace('"NaN"', "NaN"))
    (root / "latin1.jsonl").write_bytes(b'{"input": "caf\xe9", "target": "b"}\n')
    out_file = tmp_path / "r.json"
    code, out, err = run(capsys, "--ckpt", model_dir, "--eval", root, "--shots", "1",
                         "--out", out_file)  # fmt: skip
    assert code == 0, err
    assert "1 tasks x 1 shot counts (6 queries) evaluated, 2 skipped" in out
    assert "skipped nan: example 1: \"target_scores\" value of 'x' is NaN; valid: finite" in out
    assert "skipped latin1: not UTF-8 text: byte 0xe9 at line 1 (offset 14)" in out
    report = strict_json(out_file)
    assert [s["task"] for s in report["skipped"]] == ["latin1", "nan"]
    assert report["notes"] == [] and [r["task"] for r in report["results"]] == ["add"]

    import gpt.eval.scoring as scoring  # a broken model: one log-likelihood is NaN

    real = scoring.continuation_logprobs
    monkeypatch.setattr(scoring, "continuation_logprobs",
                        lambda *a, **k: [math.nan, *real(*a, **k)[1:]])  # fmt: skip
    code, out, err = run(capsys, "--ckpt", model_dir, "--eval", root / "add.jsonl", "--out",
                         out_file)  # fmt: skip
    assert code == 0, err
    report = strict_json(out_file)
    assert report["results"][0]["records"][0]["logprobs"][0] is None
    assert report["notes"] == ["results[0].records[0].logprobs[0]: nan written as null"]
    assert f"sample.py: warning: {out_file}: non-finite numbers (NaN, infinity) written as " in err


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
        (["--eval", task], f"{task}: not UTF-8 text: byte 0xe9 at line 2 (offset 44)"),
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


def test_eval_glob_through_a_symlink_loop_finishes(capsys, model_dir, tmp_path, monkeypatch):
    """`--eval 'd/**/*.jsonl'` once followed d/sub/up -> .. for hours."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    write_task(tmp_path / "d" / "sub" / "add.jsonl")
    (tmp_path / "d" / "sub" / "up").symlink_to("..")
    (tmp_path / "d" / "sub" / "self").symlink_to(".")
    with deadline(60):
        code, out, err = run(capsys, "--ckpt", model_dir, "--eval", "d/**/*.jsonl", "--limit", "2")
    assert code == 0, err
    assert "1 tasks x 1 shot counts (2 queries) evaluated, 0 skipped" in out
