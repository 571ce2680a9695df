"""Task files (JSONL and BIG-bench task.json) and few-shot prompt construction: exact prompts,
deterministic shots that never include the query, and every malformed-file error."""

import json

import pytest

from gpt.eval.tasks import Example, build_prompt, format_query, load_task, select_shots


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


MC_ROWS = [
    {"input": "2+2", "choices": ["4", "5"], "answer": 0},
    {"input": "3+3", "choices": ["7", "6"], "answer": "6"},
    {"input": "1+1", "choices": ["2", "3", "4"], "answer": 0},
    {"input": "5+5", "choices": ["10", "11"], "answer": 0},
]


def test_jsonl_multiple_choice_and_generative(tmp_path):
    task = load_task(write_jsonl(tmp_path / "mc.jsonl", [*MC_ROWS[:2], ""]))
    assert task.multiple_choice and task.name == "mc" and len(task.examples) == 2
    assert task.examples[1] == Example("3+3", choices=["7", "6"], correct=[1])
    assert task.examples[1].answer == "6"
    rows = [{"input": "capital of France", "target": "Paris"}, {"input": "x", "target": ["a", "b"]}]
    task = load_task(write_jsonl(tmp_path / "gen.jsonl", rows))
    assert not task.multiple_choice
    assert task.examples[1].targets == ["a", "b"] and task.examples[1].answer == "a"


def test_jsonl_prompt_is_exact(tmp_path):
    task = load_task(write_jsonl(tmp_path / "mc.jsonl", MC_ROWS))
    prompt = build_prompt(task, task.examples[0], [task.examples[2], task.examples[1]])
    assert prompt == "Q: 1+1\nA: 2\n\nQ: 3+3\nA: 6\n\nQ: 2+2\nA: "
    assert build_prompt(task, task.examples[0], []) == "Q: 2+2\nA: "  # zero-shot


def test_template_and_separator_override(tmp_path):
    task = load_task(
        write_jsonl(tmp_path / "mc.jsonl", MC_ROWS),
        template="Question: {input}{choices}\nAnswer:",
        separator="\n###\n",
    )
    task.choice_prefix = " | "
    prompt = build_prompt(task, task.examples[2], [task.examples[0]])
    assert prompt == "Question: 2+2 | 4 | 5\nAnswer:4\n###\nQuestion: 1+1 | 2 | 3 | 4\nAnswer:"


def test_bigbench_prefixes_and_defaults(tmp_path):
    data = {
        "task_prefix": "Pick the effect.\n",
        "example_input_prefix": "\nIn: ",
        "example_output_prefix": "\nOut: ",
        "examples": [
            {"input": "rain", "target_scores": {"wet": 1, "dry": 0}},
            {"input": "sun", "target_scores": {"wet": 0, "dry": 1, "warm": 1}},
        ],
    }
    (tmp_path / "cause").mkdir()
    task = load_task(write_json(tmp_path / "cause" / "task.json", data))
    assert task.name == "cause" and task.multiple_choice
    assert task.examples[1].correct == [1, 2] and task.examples[1].choices == ["wet", "dry", "warm"]
    prompt = build_prompt(task, task.examples[1], [task.examples[0]])
    assert prompt == (
        "Pick the effect.\n"
        "\nIn: rain\n  choice: wet\n  choice: dry\nOut: wet"
        "\n"
        "\nIn: sun\n  choice: wet\n  choice: dry\n  choice: warm\nOut: "
    )
    data = {"append_choices_to_input": False, "examples": data["examples"]}
    task = load_task(write_json(tmp_path / "plain.json", data))
    assert format_query(task, task.examples[0]) == "\nQ: rain\nA: "  # BIG-bench's defaults


def test_bigbench_generative(tmp_path):
    data = {
        "examples": [{"input": "1+1=", "target": "2"}, {"input": "2+2=", "target": ["4", "four"]}]
    }
    task = load_task(write_json(tmp_path / "arith.json", data))
    assert not task.multiple_choice and task.examples[1].targets == ["4", "four"]


def test_shots_are_deterministic_and_never_the_query(tmp_path):
    rows = [{"input": f"q{i}", "target": f"a{i}"} for i in range(12)]
    rows.append({"input": "q3", "target": "duplicate of example 3"})
    task = load_task(write_jsonl(tmp_path / "gen.jsonl", rows))
    for query in range(len(rows)):
        shots = select_shots(task, 5, seed=0, query=query)
        assert shots == select_shots(task, 5, seed=0, query=query)
        assert len(shots) == 5 and len({id(s) for s in shots}) == 5  # distinct examples
        assert all(s.input != rows[query]["input"] for s in shots)
        query_text = format_query(task, task.examples[query])
        assert query_text not in build_prompt(task, task.examples[query], shots)[: -len(query_text)]
    picks = {tuple(s.input for s in select_shots(task, 5, seed, 0)) for seed in range(10)}
    assert len(picks) > 1  # the seed chooses
    outside = Example("q7")  # a query from --prompt that happens to be in the task
    assert all(s.input != "q7" for s in select_shots(task, 10, 0, outside))
    assert select_shots(task, 0, 0, 1) == []


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"input": "a", "target": "b"}', "{not json"], r"bad\.jsonl, line 2: not valid JSON"),
        (['{"target": "b"}'], r"line 1: expected an object with a string \"input\""),
        (['["input"]'], r"line 1: expected an object"),
        (['{"input": "a"}'], r"line 1: needs \"target\" \(generative\) or \"choices\""),
        (['{"input": "a", "target": 3}'], r"line 1: 'target' must be a string"),
        (['{"input": "a", "target": []}'], r"line 1: 'target' must be a string"),
        (['{"input": "a", "choices": ["x"], "answer": 0}'], r"line 1: \"choices\" must be a list"),
        (['{"input": "a", "choices": ["x", 1], "answer": 0}'], r"line 1: 'choices' must be"),
        (['{"input": "a", "choices": ["x", "y"], "answer": 2}'], r"line 1: \"answer\" 2 is not"),
        (['{"input": "a", "choices": ["x", "y"], "answer": "z"}'], r"line 1: \"answer\" must be"),
        (['{"input": "a", "choices": ["x", "y"]}'], r"line 1: \"answer\" must be a choice index"),
        (
            [
                '{"input": "a", "target": "b"}',
                "",
                '{"input": "a", "choices": ["x", "y"], "answer": 0}',
            ],
            r"line 3: mixes generative and multiple-choice",
        ),
        (["", "  "], r"bad\.jsonl: no examples"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=match):
        load_task(path)


@pytest.mark.parametrize(
    "data, match",
    [
        ("{oops", r"task\.json: not valid JSON .* at line 1"),
        ({"examples": []}, r"task\.json: needs a non-empty \"examples\" list"),
        ([1, 2], r"task\.json: needs a non-empty \"examples\" list"),
        (
            {"examples": [{"input": "a", "target_scores": {"x": 1, "y": 0}}, {"input": "b"}]},
            r"task\.json, example 1: \"target_scores\" must map",
        ),
        (
            {"examples": [{"input": "a", "target_scores": {"x": 1, "y": "high"}}]},
            r"example 0: \"target_scores\" values must be numbers",
        ),
        (
            {"examples": [{"input": "a", "target": "b"}, {"input": "c"}]},
            r"example 1: needs \"target\"",
        ),
        (
            {"examples": [{"input": 5, "target": "b"}]},
            r"example 0: expected an object with a string",
        ),
        (
            {"examples": [{"input": "a", "target": "b"}], "task_prefix": 3},
            r"task\.json: 'task_prefix' must be a string",
        ),
    ],
)
def test_malformed_bigbench_names_file_and_example(tmp_path, data, match):
    path = tmp_path / "task.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(ValueError, match=match):
        load_task(path)


def test_file_and_option_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl: task file not found"):
        load_task(tmp_path / "missing.jsonl")
    (tmp_path / "task.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"task\.csv: unknown task format; valid: \.jsonl, \.json"):
        load_task(tmp_path / "task.csv")
    path = write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    with pytest.raises(ValueError, match=r"--template must contain \{input\}"):
        load_task(path, template="Q: {question}")
    task = load_task(path)
    with pytest.raises(ValueError, match=r"--shots 4 needs 4 examples besides the query; .*has 3"):
        select_shots(task, 4, 0, 0)
    with pytest.raises(ValueError, match="--shots must be >= 0"):
        select_shots(task, -1, 0, 0)
