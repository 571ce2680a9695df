"""Suite planning (gpt.eval.suite): skips with reasons found before any model work (a bad
file never ends the suite), the --kind filter, a lone file's problem is an error, standard
JSON (non-finite numbers as null, with notes), and the shot-curve plot."""

import json
import math

import pytest
from figures import drawn

from gpt.eval import suite as suite_module
from gpt.eval.suite import MAX_NOTES, plan_suite, plot_shot_curves, replace_non_finite


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def suite(tmp_path):
    mc = [{"input": f"q{i}", "target_scores": {"x": i % 2, "y": 1 - i % 2}} for i in range(4)]
    both = [{**e, "target": "x"} for e in mc]
    write(tmp_path / "mc" / "task.json", {"metrics": ["multiple_choice_grade"], "examples": mc})
    write(tmp_path / "both" / "task.json",
          {"metrics": ["multiple_choice_grade", "exact_str_match"], "examples": both})  # fmt: skip
    write(tmp_path / "gen" / "task.json", {"examples": [{"input": "a", "target": "b"}] * 2})
    return tmp_path


def test_kind_keeps_the_metrics_of_one_kind_and_skips_the_rest(suite):
    planned, skipped = plan_suite([str(suite)], [0, 1], progress=False, kind="multiple_choice")
    assert {p.task.name: p.task.metrics for p in planned} == {
        "both": ["multiple_choice_grade"], "mc": ["multiple_choice_grade"]}  # fmt: skip
    reason = "no multiple_choice metric (--kind multiple_choice)"
    assert skipped == [{"task": "gen", "path": str(suite / "gen" / "task.json"), "reason": reason}]
    assert all(p.task.examples == [] for p in planned)  # only the queries are kept
    assert [len(p.prompts[1]) for p in planned] == [4, 4]
    planned, skipped = plan_suite([str(suite)], [1], progress=False, kind="generative")
    assert [p.task.name for p in planned] == ["both"]  # "gen" has one distinct example
    assert [s["task"] for s in skipped] == ["gen", "mc"]
    assert skipped[0]["reason"].startswith("--shots 1 needs 1 examples besides the query")


def test_a_lone_task_file_is_an_error_not_a_skip(suite):
    with pytest.raises(ValueError, match=r"gen/task\.json has 0"):
        plan_suite([str(suite / "gen" / "task.json")], [1], progress=False)
    with pytest.raises(ValueError, match="--kind must be"):
        plan_suite([str(suite)], [0], kind="both")


def test_shot_curve_plot_draws_the_mean_then_each_task_with_its_chance(tmp_path, saved_figures):
    tasks = (("a", 0.1, 0.5), ("b", 0.2, 0.25))  # name, grade per shot, chance
    results = [
        {"task": t, "shots": k, "metrics": {"multiple_choice_grade": g * k}, "chance": c}
        for t, g, c in tasks
        for k in (0, 1, 2, 4)
    ]
    path = plot_shot_curves(results, tmp_path / "plots" / "shots.png", title="t")
    assert path == tmp_path / "plots" / "shots.png" and path.is_file()
    (fig,) = saved_figures
    assert fig._suptitle.get_text() == "t"
    assert fig._supxlabel.get_text() == "shots (demonstrations in the prompt)"
    mean, a, b = (drawn(ax) for ax in fig.axes)
    ks = [0, 1, 2, 4]
    assert mean["title"] == "mean over tasks" and mean["legend"] == ["multiple_choice_grade"]
    ((label, xs, ys),) = mean["lines"]  # no chance line: the tasks' chances differ
    assert label == "multiple_choice_grade" and xs == ks
    assert ys == pytest.approx([(0.1 * k + 0.2 * k) / 2 for k in ks])
    for panel, (task, slope, chance) in zip((a, b), tasks, strict=True):
        assert panel["title"] == f"{task}\nmultiple_choice_grade" and panel["legend"] == []
        (_, xs, ys), (_, _, level) = panel["lines"]  # the curve, then chance dashed
        assert xs == ks and ys == pytest.approx([slope * k for k in ks])
        assert level == [chance, chance]


def test_a_bad_task_is_skipped_with_its_reason_and_the_others_are_planned(suite, monkeypatch):
    """NaN scores (once an IndexError that ended the suite), a file that is not UTF-8, and
    an error no check foresaw: each task is skipped, named, with why."""
    nan = '{"examples": [{"input": "a", "target_scores": {"x": NaN, "y": 1}}]}'
    (suite / "nan").mkdir()
    (suite / "nan" / "task.json").write_text(nan)
    (suite / "latin1.jsonl").write_bytes(b'{"input": "caf\xe9", "target": "b"}\n')
    load = suite_module.load_task

    def flaky_load(path, *args):
        if path.parent.name == "both":
            raise IndexError("list index out of range")
        return load(path, *args)

    monkeypatch.setattr(suite_module, "load_task", flaky_load)
    planned, skipped = plan_suite([str(suite)], [0], progress=False)
    assert [p.task.name for p in planned] == ["gen", "mc"]
    reasons = {s["task"]: s["reason"] for s in skipped}
    assert reasons == {
        "both": "IndexError while loading: list index out of range",
        "latin1": "not UTF-8 text: byte 0xe9 at line 1 (offset 14): invalid continuation byte; "
        "task files must be UTF-8: convert it, e.g. iconv -f latin1 -t utf-8",
        "nan": "example 0: \"target_scores\" value of 'x' is NaN; "
        "valid: finite numbers (NaN, Infinity and numbers beyond +-1.8e308 are not scores)",
    }
    with pytest.raises(IndexError):  # named alone, a file's problem is an error
        plan_suite([str(suite / "both" / "task.json")], [0], progress=False)


def test_non_finite_numbers_are_written_as_null_with_a_note():
    report = {"results": [{"metrics": {"grade": math.nan}, "records": [{"logprobs": [-1.0,
              -math.inf]}]}], "config": {"seed": 1, "name": "x"}}  # fmt: skip
    clean, notes = replace_non_finite(report)
    assert clean == {"results": [{"metrics": {"grade": None}, "records": [{"logprobs": [-1.0,
                     None]}]}], "config": {"seed": 1, "name": "x"}}  # fmt: skip
    assert notes == ["results[0].metrics.grade: nan written as null",
                     "results[0].records[0].logprobs[1]: -inf written as null"]  # fmt: skip
    json.dumps(clean, allow_nan=False)
    clean, notes = replace_non_finite([math.inf] * (MAX_NOTES + 5))
    assert clean == [None] * (MAX_NOTES + 5) and len(notes) == MAX_NOTES + 1
    assert notes[0] == "[0]: inf written as null"
    assert notes[-1] == "... and 5 more non-finite numbers written as null"
    assert replace_non_finite({"ok": [1, 2.5, "s", None, True]}) == (
        {"ok": [1, 2.5, "s", None, True]}, [])  # fmt: skip
