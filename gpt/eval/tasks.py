"""Task files and zero-/few-shot prompts (in-context learning, Brown et al. 2020).

Two task formats are read:

- JSONL, one example per line: ``{"input": ..., "target": ...}`` (generative; ``target`` may
  be a list of acceptable answers) or ``{"input": ..., "choices": [...], "answer": ...}``
  (multiple choice; ``answer`` is the index of the right choice or its text).
- BIG-bench ``task.json`` (Srivastava et al. 2022): ``{"examples": [...]}`` where each example
  has ``input`` and either ``target_scores`` (multiple choice: the highest-scoring choices are
  right) or ``target`` (generative). ``task_prefix``, ``example_input_prefix``,
  ``example_output_prefix``, ``choice_prefix``, ``append_choices_to_input`` and
  ``few_shot_example_separator`` are honoured, with BIG-bench's defaults.

A prompt is ``prefix + separator.join(demonstrations + [query])``: each demonstration is the
template filled with an example followed by its answer, the query is the template alone, so
the model continues with the answer. K demonstrations are drawn from the task's other
examples by a generator seeded with (seed, query index): deterministic, never the query.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

# BIG-bench's defaults (bigbench/api/json_task.py)
BIGBENCH_INPUT_PREFIX = "\nQ: "
BIGBENCH_OUTPUT_PREFIX = "\nA: "
BIGBENCH_CHOICE_PREFIX = "\n  choice: "
BIGBENCH_SEPARATOR = "\n"


@dataclass
class Example:
    input: str
    targets: list[str] = field(default_factory=list)  # generative: acceptable answers
    choices: list[str] = field(default_factory=list)  # multiple choice: candidate answers
    correct: list[int] = field(default_factory=list)  # multiple choice: indices of right ones

    @property
    def answer(self) -> str:
        """The answer a demonstration shows: the first right choice, or the first target."""
        return self.choices[self.correct[0]] if self.choices else self.targets[0]


@dataclass
class Task:
    path: Path
    examples: list[Example]
    multiple_choice: bool
    template: str = "Q: {input}\nA: "  # {input}: the example's input; {choices}: its choices
    separator: str = "\n\n"  # between demonstrations and before the query
    prefix: str = ""  # before the first demonstration (BIG-bench's task_prefix)
    choice_prefix: str = BIGBENCH_CHOICE_PREFIX  # before each choice where {choices} stands

    @property
    def name(self) -> str:
        return self.path.parent.name if self.path.name == "task.json" else self.path.stem


def _fail(where: str, what: str):
    raise ValueError(f"{where}: {what}")


def _string_list(value, where: str, key: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) for v in values):
        _fail(where, f"{key!r} must be a string or a non-empty list of strings, got {value!r}")
    return values


def _jsonl_example(obj, where: str) -> Example:
    if not isinstance(obj, dict) or not isinstance(obj.get("input"), str):
        _fail(where, 'expected an object with a string "input"')
    if "choices" in obj:
        choices = obj["choices"]
        if not isinstance(choices, list) or len(choices) < 2:
            _fail(where, f'"choices" must be a list of at least 2 strings, got {choices!r}')
        _string_list(choices, where, "choices")
        answer = obj.get("answer")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int):
            _fail(where, f'"answer" must be a choice index or one of the choices, got {answer!r}')
        if not 0 <= answer < len(choices):
            _fail(where, f'"answer" {answer} is not an index of the {len(choices)} choices')
        return Example(obj["input"], choices=choices, correct=[answer])
    if "target" in obj:
        return Example(obj["input"], targets=_string_list(obj["target"], where, "target"))
    _fail(where, 'needs "target" (generative) or "choices" and "answer" (multiple choice)')


def _bigbench_example(obj, where: str, multiple_choice: bool) -> Example:
    if not isinstance(obj, dict) or not isinstance(obj.get("input"), str):
        _fail(where, 'expected an object with a string "input"')
    if not multiple_choice:
        if "target" not in obj:
            _fail(where, 'needs "target" (the task\'s first example is generative)')
        return Example(obj["input"], targets=_string_list(obj["target"], where, "target"))
    scores = obj.get("target_scores")
    if not isinstance(scores, dict) or len(scores) < 2:
        _fail(where, '"target_scores" must map at least 2 choices to scores')
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores.values()):
        _fail(where, f'"target_scores" values must be numbers, got {scores!r}')
    choices, best = list(scores), max(scores.values())
    return Example(
        obj["input"],
        choices=choices,
        correct=[choices.index(c) for c in choices if scores[c] == best],
    )


def _load_jsonl(path: Path) -> Task:
    examples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            _fail(where, f"not valid JSON ({err.msg})")
        example = _jsonl_example(obj, where)
        if examples and bool(example.choices) != bool(examples[0].choices):
            _fail(where, "mixes generative and multiple-choice examples")
        examples.append(example)
    if not examples:
        _fail(str(path), "no examples")
    return Task(path, examples, multiple_choice=bool(examples[0].choices))


def _load_bigbench(path: Path) -> Task:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        _fail(str(path), f"not valid JSON ({err.msg} at line {err.lineno})")
    raw = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(raw, list) or not raw:
        _fail(str(path), 'needs a non-empty "examples" list (BIG-bench task.json)')
    multiple_choice = isinstance(raw[0], dict) and "target_scores" in raw[0]
    examples = [
        _bigbench_example(obj, f"{path}, example {i}", multiple_choice) for i, obj in enumerate(raw)
    ]
    for key in (
        "task_prefix",
        "example_input_prefix",
        "example_output_prefix",
        "choice_prefix",
        "few_shot_example_separator",
    ):
        if key in data and not isinstance(data[key], str):
            _fail(str(path), f"{key!r} must be a string, got {data[key]!r}")
    choices = "{choices}" if multiple_choice and data.get("append_choices_to_input", True) else ""
    template = (
        data.get("example_input_prefix", BIGBENCH_INPUT_PREFIX)
        + "{input}"
        + choices
        + data.get("example_output_prefix", BIGBENCH_OUTPUT_PREFIX)
    )
    return Task(
        path,
        examples,
        multiple_choice,
        template=template,
        separator=data.get("few_shot_example_separator", BIGBENCH_SEPARATOR),
        prefix=data.get("task_prefix", ""),
        choice_prefix=data.get("choice_prefix", BIGBENCH_CHOICE_PREFIX),
    )


def load_task(path: str | Path, template: str | None = None, separator: str | None = None) -> Task:
    """Read a ``.jsonl`` task or a BIG-bench ``.json`` task; ``template`` and ``separator``
    replace the file's (or the format's default) formatting."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: task file not found")
    if path.suffix == ".jsonl":
        task = _load_jsonl(path)
    elif path.suffix == ".json":
        task = _load_bigbench(path)
    else:
        raise ValueError(f"{path}: unknown task format; valid: .jsonl, .json (BIG-bench task.json)")
    if template is not None:
        if "{input}" not in template:
            raise ValueError(f"--template must contain {{input}}, got {template!r}")
        task = dataclasses.replace(task, template=template)
    if separator is not None:
        task = dataclasses.replace(task, separator=separator)
    return task


def select_shots(task: Task, k: int, seed: int, query: int | Example) -> list[Example]:
    """K demonstrations for the query (an index into ``task.examples`` or an example from
    elsewhere), drawn without replacement from the other examples by a generator seeded with
    (seed, query index). Examples with the query's input are never drawn."""
    if k < 0:
        raise ValueError(f"--shots must be >= 0, got {k}")
    index = query if isinstance(query, int) else -1
    text = task.examples[query].input if isinstance(query, int) else query.input
    pool = [e for i, e in enumerate(task.examples) if i != index and e.input != text]
    if k > len(pool):
        raise ValueError(
            f"--shots {k} needs {k} examples besides the query; {task.path} has {len(pool)}"
        )
    return random.Random(f"{seed}:{index}").sample(pool, k)


def format_query(task: Task, example: Example) -> str:
    """The template filled with the example (what the model continues with the answer)."""
    choices = "".join(task.choice_prefix + c for c in example.choices)
    return task.template.replace("{choices}", choices).replace("{input}", example.input)


def build_prompt(task: Task, query: Example, shots: list[Example]) -> str:
    """prefix + demonstrations (query text + answer) + the query, joined by the separator."""
    demos = [format_query(task, s) + s.answer for s in shots]
    return task.prefix + task.separator.join([*demos, format_query(task, query)])
