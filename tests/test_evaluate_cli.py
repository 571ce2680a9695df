"""python -m gpt.eval end to end, in process: one task and suites at several shot counts,
the results JSON and plot, every error path (status 2, `python -m gpt.eval: error: ...`), and
`sample.py --eval ...` (evaluation's old home) forwarding here with a one-line note."""

import json
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
from deadline import deadline

from gpt import GPT, ModelConfig
from gpt.cli import evaluate, sample

PROG = "python -m gpt.eval"


def run(capsys, *argv, main=evaluate.main):
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def write_task(path: Path) -> Path:
    rows = [{"input": f"{i}+{i}", "choices": [str(2 * i), str(2 * i + 1)], "answer": 0}
            for i in range(6)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_one_task_writes_results_json(capsys, model_dir, tmp_path):
    task = write_task(tmp_path / "add.jsonl")
    out_file = tmp_path / "res" / "results.json"
    code, out, _ = run(capsys, "--ckpt", model_dir, "--tasks", task, "--shots", "2", "--limit", "4",
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


def test_suite_of_tasks_at_several_shots_is_deterministic(
    capsys, model_dir, tmp_path, saved_figures
):
    root = write_suite(tmp_path / "suite")
    outs = [tmp_path / "a" / "r.json", tmp_path / "b" / "r.json"]
    for out_file in outs:
        code, out, err = run(capsys, "--ckpt", model_dir, "--tasks", root, "--shots", "0", "2",
                             "--out", out_file)  # fmt: skip
        assert code == 0, err
    assert outs[0].read_bytes() == outs[1].read_bytes()  # two identical runs, identical JSON
    assert (tmp_path / "a" / "r.png").is_file()  # beside --out
    report = json.loads(outs[0].read_text())
    # the plot: the mean over tasks, then one panel per task, each metric against the shots
    fig = saved_figures[0]
    assert fig._suptitle.get_text() == str(model_dir)
    curves = {}
    for r in report["results"]:
        for metric, value in r["metrics"].items():
            curves.setdefault((r["task"], metric), []).append(value)
    mean, *panels = (ax for ax in fig.axes if ax.axison)
    assert [ax.get_title() for ax in panels] == [f"{t}\n{m}" for t, m in curves]
    for ax, values in zip(panels, curves.values(), strict=True):
        assert list(ax.get_lines()[0].get_xdata()) == [0, 2]
        assert list(ax.get_lines()[0].get_ydata()) == pytest.approx(values)
    metrics = list(dict.fromkeys(m for _, m in curves))
    assert [line.get_label() for line in mean.get_lines()] == metrics
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


def test_output_that_cannot_be_written_is_refused_before_any_work(capsys, model_dir, tmp_path):
    task = write_task(tmp_path / "add.jsonl")
    (tmp_path / "a_file").write_text("")
    for out, match in [(tmp_path, "is a directory"), (tmp_path / "a_file" / "r.json", "is a file")]:
        code, stdout, err = run(capsys, "--ckpt", model_dir, "--tasks", task, "--out", out)
        assert code == 2 and f"--out {out}" in err and match in err, err
        assert stdout == ""  # nothing evaluated
    code, _, err = run(capsys, "--ckpt", model_dir, "--tasks", task, "--plot", tmp_path)
    assert code == 2 and "--plot" in err and "is a directory" in err


def strict_json(path: Path):
    """The file as RFC 8259 JSON: NaN, Infinity and -Infinity are refused."""

    def refuse(name):
        raise ValueError(f"{path}: non-standard JSON constant {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_suite_skips_bad_tasks_and_always_writes_standard_json(
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
    code, out, err = run(capsys, "--ckpt", model_dir, "--tasks", root, "--shots", "1",
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
    code, out, err = run(capsys, "--ckpt", model_dir, "--tasks", root / "add.jsonl", "--out",
                         out_file)  # fmt: skip
    assert code == 0, err
    report = strict_json(out_file)
    assert report["results"][0]["records"][0]["logprobs"][0] is None
    assert report["notes"] == ["results[0].records[0].logprobs[0]: nan written as null"]
    assert f"{PROG}: warning: {out_file}: non-finite numbers (NaN, infinity) written as " in err


def test_glob_through_a_symlink_loop_finishes(capsys, model_dir, tmp_path, monkeypatch):
    """`--tasks 'd/**/*.jsonl'` (then `sample.py --eval`) once followed d/sub/up -> .. for
    hours."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d" / "sub").mkdir(parents=True)
    write_task(tmp_path / "d" / "sub" / "add.jsonl")
    (tmp_path / "d" / "sub" / "up").symlink_to("..")
    (tmp_path / "d" / "sub" / "self").symlink_to(".")
    with deadline(60):
        code, out, err = run(capsys, "--ckpt", model_dir, "--tasks", "d/**/*.jsonl", "--limit", "2")
    assert code == 0, err
    assert "1 tasks x 1 shot counts (2 queries) evaluated, 0 skipped" in out


def test_padded_vocabulary_evaluates_with_the_bytes_tokenizer(capsys, tmp_path):
    """A 300-token model (padded past bytes' 257) whose padding ids are the most likely:
    evaluation never generates them, so the bytes tokenizer can decode every answer."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        model.transformer.wte.weight[257:] = model.transformer.wte.weight[:43] * 40.0
    model.save_pretrained(tmp_path / "m", tokenizer="bytes")
    rows = [{"input": "a", "target": "b"}, {"input": "c", "target": "d"}]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run(capsys, "--ckpt", tmp_path / "m", "--tasks", tmp_path / "g.jsonl",
                         "--tokenizer", "bytes", "--shots", "1")  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--shots", "-1"], "--shots must be >= 0, got -1"),
        (["--shots", "1", "1"], "--shots lists a count twice: 1 1"),
        (["--limit", "0"], "--limit must be >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--max-new-tokens", "-2"], "--max-new-tokens must be >= 0, got -2"),
        (["--attention", "nope"], "unknown attention backend 'nope'; valid names: naive"),
        (["--tokenizer", "nope"], "unknown encoding 'nope'; valid: gpt2"),
        (["--device", "tpu9"], "--device 'tpu9' is not a device"),
        (["--kind", "mc"], r"--kind: invalid choice: 'mc' \(choose from"),
        # sampling's flags are not evaluation's: greedy scoring has no temperature
        (["--temperature", "0"], "unrecognized arguments: --temperature 0"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(capsys, model_dir, argv, match, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    write_task(tmp_path / "t.jsonl")
    code, out, err = run(capsys, "--ckpt", model_dir, "--tasks", "t.jsonl", *argv)
    assert code == 2 and out == ""
    assert err.startswith(f"{PROG}: error: ") or f"\n{PROG}: error: " in err, err
    assert re.search(match, err), err


def test_tasks_is_required_and_named(capsys, model_dir):
    code, _, err = run(capsys, "--ckpt", model_dir, "--shots", "0", "1")
    assert code == 2 and "the following arguments are required: --tasks" in err


def test_path_and_file_errors_exit_2(capsys, model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n{"input": "c"}\n')
    task = write_task(tmp_path / "add.jsonl")
    cases = [
        (["--ckpt", tmp_path / "nowhere", "--tasks", task], "not a model directory"),
        (["--ckpt", model_dir, "--tasks", bad], r"bad\.jsonl, line 2: needs \"target\""),
        (["--ckpt", model_dir, "--tasks", task, "--shots", "6"], "--shots 6 needs 6 examples"),
        (["--ckpt", model_dir, "--tasks", task, "--template", "Q"], r"--template must contain"),
        (["--ckpt", model_dir, "--tasks", tmp_path / "none*"], r"--tasks .*none\*: no task files"),
    ]
    for argv, match in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.startswith(f"{PROG}: error: ")
        assert re.search(match, err), (argv, err)


def test_a_task_file_in_the_wrong_encoding_is_a_one_line_error(capsys, model_dir, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_bytes(b'{"input": "a", "target": "b"}\n{"input": "caf\xe9", "target": "b"}\n')
    code, out, err = run(capsys, "--ckpt", model_dir, "--max-new-tokens", "1", "--tasks", task)
    message = f"{task}: not UTF-8 text: byte 0xe9 at line 2 (offset 44)"
    assert code == 2 and err.startswith(f"{PROG}: error: {message}"), err
    assert err.count("\n") == 1 and out == ""


def test_sample_py_eval_forwards_with_a_one_line_note(capsys, model_dir, tmp_path):
    """`sample.py --eval TASKS ...` (before python -m gpt.eval existed) still runs: the same
    evaluation, the same JSON, and one line on stderr giving the command to use now."""
    task = write_task(tmp_path / "add.jsonl")
    flags = ["--shots", "0", "2", "--limit", "4", "--batch-size", "3", "--plot", tmp_path / "p.png"]
    code, new_out, err = run(capsys, "--ckpt", model_dir, "--tasks", task, *flags,
                             "--out", tmp_path / "new.json")  # fmt: skip
    assert code == 0 and "note" not in err, err
    old = ["--ckpt", model_dir, "--eval", task, *flags, "--out", tmp_path / "old.json"]
    code, old_out, err = run(capsys, *old, main=sample.main)
    assert code == 0, err
    expected = [str(a) for a in old]
    expected[2] = "--tasks"
    note = f"sample.py: note: evaluation moved to its own command; running: {PROG} "
    assert err.startswith(f"{note}{shlex.join(expected)}\n"), err
    assert err.count("sample.py: note:") == 1  # one line; the rest is the progress bar
    new, old_report = (json.loads((tmp_path / f).read_text()) for f in ("new.json", "old.json"))
    assert old_report == new and new["config"]["tasks"] == [str(task)]
    assert new["config"]["eval"] == [str(task)]  # the key scripts read before gpt.eval
    timing = re.compile(r"in [0-9.]+ s")  # the closing line's wall-clock time
    assert timing.sub("", old_out).replace("old.json", "new.json") == timing.sub("", new_out)
    assert "1 tasks x 2 shot counts (8 queries) evaluated" in old_out
    assert f"results written to {tmp_path / 'old.json'}" in old_out
    # --eval=TASK is the same flag, forwarded as --tasks=TASK
    code, out, err = run(capsys, "--ckpt", model_dir, f"--eval={task}", "--limit", "1",
                         main=sample.main)  # fmt: skip
    assert code == 0 and f"running: {PROG} --ckpt {model_dir} --tasks={task} --limit 1\n" in err
    assert "1 tasks x 1 shot counts (1 queries) evaluated" in out


def test_forwarded_errors_are_the_evaluation_commands_own(capsys, model_dir, tmp_path):
    """sample.py once refused `--eval` with `--task`, `--attention-map`, `--out` without
    `--eval` and several `--shots` without it: rules of two programs sharing one parser.
    Forwarded, a sampling flag is simply not a flag of python -m gpt.eval."""
    task = write_task(tmp_path / "add.jsonl")
    for extra, match in [
        (["--task", task], f"unrecognized arguments: --task {task}"),
        (["--attention-map", "a.png"], "unrecognized arguments: --attention-map a.png"),
        (["--limit", "0"], "--limit must be >= 1, got 0"),
    ]:
        code, out, err = run(capsys, "--ckpt", model_dir, "--eval", task, *extra,
                             main=sample.main)  # fmt: skip
        note, error = err.splitlines()[0], err.splitlines()[-1]
        assert code == 2 and out == ""
        assert note.startswith(
            f"sample.py: note: evaluation moved to its own command; running: {PROG} "
        )
        assert error.startswith(f"{PROG}: error: ") and re.search(match, error), err


def test_both_entry_points_run_as_commands(model_dir, tmp_path):
    """`python -m gpt.eval` (gpt/eval/__main__.py) and `python sample.py --eval` as a user
    runs them: the same table on stdout, status 0, the note only from sample.py."""
    from runs import run_script

    task = write_task(tmp_path / "add.jsonl")
    outs = {}
    for script, flag in ((["-m", "gpt.eval"], "--tasks"), (["sample.py"], "--eval")):
        proc = run_script([*script, "--ckpt", str(model_dir), flag, str(task), "--limit", "2"])
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert ("sample.py: note: evaluation moved" in err) == (flag == "--eval"), err
        outs[flag] = re.sub(r"in [0-9.]+ s", "", out)
    assert outs["--tasks"] == outs["--eval"]
    assert "1 tasks x 1 shot counts (2 queries) evaluated, 0 skipped" in outs["--tasks"]


def test_sample_py_eval_takes_the_abbreviations_the_old_parser_took(capsys, model_dir, tmp_path):
    """Before evaluation moved, one parser took --eva and --batch for --eval and
    --batch-size (argparse's unique prefixes): the forwarding spells them out."""
    task = write_task(tmp_path / "add.jsonl")
    argv = ["--ckpt", model_dir, "--eva", task, "--batch", "3", "--lim", "2"]
    code, out, err = run(capsys, *[*argv, "--out", tmp_path / "r.json"], main=sample.main)
    assert code == 0, err
    spelt = ["--ckpt", str(model_dir), "--tasks", str(task), "--batch-size", "3", "--limit", "2"]
    assert shlex.join(spelt) in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["batch_size"] == 3 and report["config"]["limit"] == 2
    # a prefix of a sampling flag, or of two flags, is left for the evaluation to refuse
    for flag, refused in (("--temp", "--temp"), ("--s", "--s")):
        code, _, err = run(capsys, "--ckpt", model_dir, "--eval", task, flag, "1", main=sample.main)
        assert code == 2 and f"unrecognized arguments: {refused}" in err, err


def test_a_model_whose_sdpa_kernels_cannot_run_here_samples_with_a_warning(
    capsys, model_dir, tmp_path
):
    """config.json records model.sdpa_kernels; a list trained on a GPU (["cudnn"]) does not
    run on a CPU: sampling and evaluation warn, naming the file and key, and use the
    default order."""
    import shutil

    from gpt.store import write_checksums

    moved = tmp_path / "model"
    shutil.copytree(model_dir, moved)
    config = json.loads((moved / "config.json").read_text())
    config["gpt_config"]["sdpa_kernels"] = ["cudnn"]
    (moved / "config.json").write_text(json.dumps(config))
    write_checksums(moved)
    task = write_task(tmp_path / "add.jsonl")
    code, out, err = run(capsys, "--ckpt", moved, "--tasks", task, "--limit", "2")
    assert code == 0, err
    assert f"{PROG}: warning: {moved / 'config.json'}: model.sdpa_kernels = ['cudnn']" in err
    assert "using the default order" in err and "2 queries" in out
    code, out, err = run(capsys, "--ckpt", moved, "--prompt", "ab", "--max-new-tokens", "3",
                         main=sample.main)  # fmt: skip
    assert code == 0 and "sample.py: warning:" in err and "model.sdpa_kernels" in err, err
