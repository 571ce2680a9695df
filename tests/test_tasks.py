"""Task files (JSONL and BIG-bench task.json) and few-shot prompt construction: exact prompts,
deterministic shots that never include the query, and every malformed-file error."""

import json
import re
from pathlib import Path

import pytest
from deadline import deadline

from gpt.eval.tasks import (
    Example,
    build_prompt,
    find_task_files,
    format_query,
    load_task,
    select_shots,
)


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
    assert task.examples[1] == Example("3+3", choices=["7", "6"], scores=[0.0, 1.0])
    assert task.examples[1].correct == [1] and task.metrics == ["multiple_choice_grade"]
    assert task.examples[1].answer == "6"
    rows = [{"input": "capital of France", "target": "Paris"}, {"input": "x", "target": ["a", "b"]}]
    task = load_task(write_jsonl(tmp_path / "gen.jsonl", rows))
    assert not task.multiple_choice and task.metrics == ["exact_str_match"]
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
    # listed as BIG-bench does: sorted, then shuffled by a generator seeded with the index
    assert task.examples[0].listed == ["dry", "wet"]  # random.Random(0) on sorted choices
    assert task.examples[1].listed == ["warm", "wet", "dry"]  # random.Random(1)
    prompt = build_prompt(task, task.examples[1], [task.examples[0]])
    assert prompt == (
        "Pick the effect.\n"
        "\nIn: rain\n  choice: dry\n  choice: wet\nOut: wet"
        "\n"
        "\nIn: sun\n  choice: warm\n  choice: wet\n  choice: dry\nOut: "
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
        assert all(s is not task.examples[query] and s != task.examples[query] for s in shots)
        if rows[query]["input"] != "q3":  # q3 has a twin with another answer: a fair shot
            query_text = format_query(task, task.examples[query])
            prompt = build_prompt(task, task.examples[query], shots)
            assert query_text not in prompt[: -len(query_text)]
    twins = [select_shots(task, 11, seed, 3) for seed in range(5)]
    assert any(task.examples[12] in shots for shots in twins)  # same input, other answer
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
            r"task\.json, example 1: \"target_scores\" must map at least one choice",
        ),
        (
            {"examples": [{"input": "a", "target_scores": {"x": 1, "y": "high"}}]},
            r"example 0: \"target_scores\" values must be numbers",
        ),
        (
            {"examples": [{"input": "a", "target": "b"}, {"input": "c"}]},
            r"example 1: needs \"target\" \(the task is scored by generation\)",
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


def test_jsonl_and_bigbench_metric_settings(tmp_path):
    data = {
        "metrics": ["exact_str_match", "bleu", "multiple_choice_grade"],
        "stop_string": ".",
        "examples": [
            {"input": "a", "target": "x", "target_scores": {"x": 1, "y": 0}},
            {"input": "b", "target": ["y", "z"], "target_scores": {"x": 0, "y": 1}},
        ],
    }
    task = load_task(write_json(tmp_path / "both.json", data))
    assert task.multiple_choice and task.metrics == ["exact_str_match", "multiple_choice_grade"]
    assert task.unimplemented == ["bleu"]
    assert task.stop_string == "." and task.output_regex is None  # a stop string: no regex
    data = {"metrics": ["rouge", "bleu"], "examples": [{"input": "a", "target": "b"}]}
    task = load_task(write_json(tmp_path / "rouge.json", data))
    assert task.metrics == [] and task.unimplemented == ["rouge", "bleu"]
    data = {"metrics": ["exact_str_match"], "examples": [{"input": "a", "target": "b"}]}
    task = load_task(write_json(tmp_path / "gen.json", data))
    assert task.output_regex == r"[^\.\?\!\;\n]+" and task.stop_string is None  # the default


def test_empty_inputs_still_give_shots_and_duplicates_are_dropped(tmp_path):
    """cause_and_effect/one_sentence: every input is empty, the choices carry the content."""
    examples = [{"input": "", "target_scores": {f"c{i}": 1, f"e{i}": 0}} for i in range(4)]
    examples.append(dict(examples[0]))  # an exact copy: dropped, as BIG-bench does
    task = load_task(write_json(tmp_path / "empty.json", {"examples": examples}))
    assert len(task.examples) == 4
    for query in range(4):
        shots = select_shots(task, 3, seed=1, query=query)
        assert len(shots) == 3 and task.examples[query] not in shots
    with pytest.raises(ValueError, match=r"--shots 4 needs 4 examples besides the query; .*has 3"):
        select_shots(task, 4, 1, 0)


def test_same_input_other_answer_is_a_fair_shot_but_an_exact_copy_is_not(tmp_path):
    rows = [
        {"input": "q", "target": "a"},
        {"input": "q", "target": "b"},
        {"input": "r", "target": "c"},
    ]
    task = load_task(write_jsonl(tmp_path / "g.jsonl", [*rows, rows[0]]))  # JSONL keeps copies
    assert len(task.examples) == 4
    assert {s.answer for s in select_shots(task, 2, 0, 0)} == {"b", "c"}  # never index 0, 3
    with pytest.raises(ValueError, match="has 2"):
        select_shots(task, 3, 0, 0)


def test_fractional_scores_several_right_choices_and_lists_of_targets(tmp_path):
    data = {
        "task_prefix": "Rate it.",
        "few_shot_example_separator": "\n###",
        "choice_prefix": " | ",
        "example_input_prefix": "In: ",
        "example_output_prefix": " Out:",
        "examples": [
            {"input": "good", "target_scores": {"a": 0.25, "b": 1.0, "c": 1.0, "d": 0.0}},
            {"input": "bad {choices}", "target_scores": {"a": 1, "b": 0}, "target": ["b", "a"]},
        ],
    }
    task = load_task(write_json(tmp_path / "frac.json", data))
    good, bad = task.examples
    assert good.scores == [0.25, 1.0, 1.0, 0.0] and good.correct == [1, 2] and good.answer == "b"
    assert bad.answer == "b"  # a "target" beside the target_scores is what demonstrations show
    prompt = build_prompt(task, bad, [good])
    listing = "".join(" | " + c for c in good.listed)
    assert bad.listed == ["b", "a"]  # random.Random(1).shuffle(["a", "b"])
    assert prompt == f"Rate it.In: good{listing} Out:b\n###In: bad {{choices}} | b | a Out:"


def test_subtasks_are_found_and_a_container_names_them(tmp_path):
    root = tmp_path / "suite"
    write_json(tmp_path / "lone.json", {"examples": [{"input": "a", "target": "b"}]})
    (root / "parent" / "one").mkdir(parents=True)
    (root / "parent" / "two").mkdir()
    write_json(root / "parent" / "task.json", {"name": "parent", "metrics": []})
    for sub in ("one", "two"):
        data = {"examples": [{"input": "a", "target": "b"}]}
        write_json(root / "parent" / sub / "task.json", data)
    write_jsonl(root / "extra.jsonl", [{"input": "a", "target": "b"}])
    found = find_task_files(str(root))
    assert [str(p.relative_to(root)) for p in found] == [
        "extra.jsonl", "parent/one/task.json", "parent/task.json", "parent/two/task.json",
    ]  # fmt: skip
    assert load_task(root / "parent" / "one" / "task.json").name == "parent:one"
    with pytest.raises(ValueError, match=r"parent/task\.json: a container task .*\(one, two\)"):
        load_task(root / "parent" / "task.json")
    assert find_task_files(str(root / "**" / "t*.json")) == found[1:]
    with pytest.raises(ValueError, match=r"--tasks .*nothing\*: no task files .*: the pattern"):
        find_task_files(str(tmp_path / "nothing*"))
    with pytest.raises(ValueError, match=r"no task files .*: no such file or directory$"):
        find_task_files(str(tmp_path / "gone"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"the directory holds no task\.json or \.jsonl file$"):
        find_task_files(str(tmp_path / "empty"))
    missing = str(tmp_path / "bigbench-1.0.0" / "benchmark_tasks" / "cause_and_effect")
    with pytest.raises(
        ValueError,
        match=r"no such file or directory; fetch BIG-bench into .*"
        r"`make bigbench`, .* --from PATH",
    ):
        find_task_files(missing)


@pytest.mark.parametrize(
    "score, shown",
    [("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity"), ("1e400", "Infinity"),
     ("1" + "0" * 400, "an integer of 401 digits")],
)  # fmt: skip
def test_non_finite_target_scores_are_refused_naming_file_example_and_choice(
    tmp_path, score, shown
):
    """json.loads reads NaN, Infinity and 1e400 (as inf): a NaN score once made "the right
    choice" an empty list (an IndexError that ended a whole suite), an infinite one printed
    "inf%" and wrote non-standard JSON."""
    good = '{"input": "q", "target_scores": {"yes": 1, "no": 0}}'
    bad = f'{{"input": "r", "target_scores": {{"yes": 1, "no": {score}}}}}'
    path = tmp_path / "task.json"
    path.write_text(f'{{"examples": [{good}, {bad}]}}')
    match = (
        rf"task\.json, example 1: \"target_scores\" value of 'no' is {re.escape(shown)}; "
        r"valid: finite numbers \(NaN, Infinity and numbers beyond \+-1\.8e308 are not scores\)$"
    )
    with pytest.raises(ValueError, match=match):
        load_task(path)
    path.write_text(f'{{"examples": [{good}, {good.replace("0", "1e308")}]}}')
    assert load_task(path).examples[1].scores == [1.0, 1e308]  # huge but finite is a score


def test_task_files_that_are_not_utf8_name_the_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"input": "a", "target": "b"}\n{"input": "caf\xe9", "target": "b"}\n')
    with pytest.raises(ValueError) as err:
        load_task(path)
    assert str(err.value) == (
        f"{path}: not UTF-8 text: byte 0xe9 at line 2 (offset 44): invalid continuation byte; "
        "task files must be UTF-8: convert it, e.g. iconv -f latin1 -t utf-8"
    )
    path = write_json(tmp_path / "task.json", {"examples": [{"input": "a", "target": "b"}]})
    path.write_bytes(path.read_text().encode("utf-16"))
    with pytest.raises(ValueError, match=r"task\.json: not UTF-8 text \(it looks like UTF-16\): "
                       r"byte 0xff at line 1 .* iconv -f utf-16 -t utf-8$"):  # fmt: skip
        load_task(path)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"examples": [{"input": "a", "target": "b"}]})
                     .encode())  # fmt: skip
    assert load_task(path).examples[0].input == "a"  # a UTF-8 byte-order mark is fine
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"task\.json: JSON nested too deeply"):
        load_task(path)


def test_task_files_behind_a_symlink_loop_are_found_once(tmp_path, monkeypatch):
    """glob.glob("d/**/*.jsonl") followed d/sub/up -> .. for hours; a directory is now read
    once, and a folder reached only through a link is read."""
    monkeypatch.chdir(tmp_path)
    row = [{"input": "a", "target": "b"}]
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    write_jsonl(tmp_path / "d" / "sub" / "one.jsonl", row)
    write_jsonl(tmp_path / "outside" / "two.jsonl", row)
    (tmp_path / "d" / "sub" / "up").symlink_to("..")
    (tmp_path / "d" / "sub" / "self").symlink_to(".")
    (tmp_path / "d" / "out").symlink_to("../outside")
    (tmp_path / "outside" / "back").symlink_to("../d")
    expected = [Path("d/out/two.jsonl"), Path("d/sub/one.jsonl")]
    with deadline(20):
        assert find_task_files("d/**/*.jsonl") == expected
        assert find_task_files("d") == expected
