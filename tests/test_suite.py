"""Suite planning (gpt.eval.suite): skips with reasons found before any model work, the
--kind filter, a lone file's problem is an error, and the shot-curve plot."""

import json

import pytest

from gpt.eval.suite import plan_suite, plot_shot_curves


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


def test_shot_curve_plot_is_a_png(tmp_path):
    results = [{"task": t, "shots": k, "metrics": {"multiple_choice_grade": 0.1 * k}, "chance": 0.5}
               for t in ("a", "b") for k in (0, 1, 2, 4)]  # fmt: skip
    path = plot_shot_curves(results, tmp_path / "plots" / "shots.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
