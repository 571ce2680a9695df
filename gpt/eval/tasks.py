"""Task files and zero-/few-shot prompts (in-context learning, Brown et al. 2020).

Two task formats are read:

- JSONL, one example per line: ``{"input": ..., "target": ...}`` (generative; ``target`` may
  be a list of acceptable answers) or ``{"input": ..., "choices": [...], "answer": ...}``
  (multiple choice; ``answer`` is the index of the right choice or its text).
- BIG-bench ``task.json`` (Srivastava et al. 2022): ``{"examples": [...], "metrics": [...]}``
  where each example has ``input`` and ``target_scores`` (multiple choice: a score per
  choice, the highest-scoring choices are right, fractional scores count as partial credit)
  and/or ``target`` (generative: a string or a list of acceptable strings). ``task_prefix``,
  ``example_input_prefix``, ``example_output_prefix``, ``choice_prefix``,
  ``append_choices_to_input``, ``few_shot_example_separator``, ``stop_string`` and
  ``output_regex`` are honoured with BIG-bench's defaults (``bigbench/api/json_task.py``).
  A ``task.json`` without examples is a container whose subtasks sit in subdirectories.

Task files are UTF-8 (a file that is not is refused naming its line and byte), and scores
must be finite: JSON's NaN and Infinity (which ``json`` reads) are refused naming the example.

A prompt is ``prefix + separator.join(demonstrations + [query])``: each demonstration is the
template filled with an example followed by its answer, the query is the template alone, so
the model continues with the answer. As in BIG-bench, the choices listed in a multiple-choice
prompt are sorted and then shuffled (the files often list the right one first), the same way
for an example wherever it appears. K demonstrations are drawn from the task's other examples
by a generator seeded with (seed, query index): deterministic, never the query itself (by
index) nor an exact copy of it; an example with the query's input but another answer may be
drawn (some tasks, e.g. cause_and_effect/one_sentence, have an empty input everywhere).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from gpt.data.globbing import glob_files, walk_files

# BIG-bench's defaults (bigbench/api/json_task.py)
BIGBENCH_INPUT_PREFIX = "\nQ: "
BIGBENCH_OUTPUT_PREFIX = "\nA: "
BIGBENCH_CHOICE_PREFIX = "\n  choice: "
BIGBENCH_SEPARATOR = "\n"
BIGBENCH_OUTPUT_REGEX = r"[^\.\?\!\;\n]+"  # used when a task gives neither regex nor stop string

# the metrics scored here; a task's others are listed as not implemented
MULTIPLE_CHOICE_METRICS = ("multiple_choice_grade",)
GENERATIVE_METRICS = ("exact_str_match", "case_insensitive_str_match")
IMPLEMENTED_METRICS = MULTIPLE_CHOICE_METRICS + GENERATIVE_METRICS


@dataclass
class Example:
    input: str
    targets: list[str] = field(default_factory=list)  # generative: acceptable answers
    choices: list[str] = field(default_factory=list)  # multiple choice: candidates, file order
    scores: list[float] = field(default_factory=list)  # multiple choice: score of each choice
    # BIG-bench lists the choices in a prompt sorted, then shuffled by this example's index
    shuffle: bool = field(default=False, compare=False)
    index: int = field(default=0, compare=False)

    @property
    def listed(self) -> list[str]:
        """The choices in the order a prompt lists them."""
        if not self.shuffle:
            return self.choices
        listed = sorted(self.choices)
        random.Random(self.index).shuffle(listed)  # the same listing wherever it is shown
        return listed

    @property
    def correct(self) -> list[int]:
        """Indices of the right choices: those with the highest score."""
        best = max(self.scores, default=None)
        return [i for i, s in enumerate(self.scores) if s == best]

    @property
    def answer(self) -> str:
        """The answer a demonstration shows: the first target, else the first right choice."""
        return self.targets[0] if self.targets else self.choices[self.correct[0]]


@dataclass
class Task:
    path: Path
    examples: list[Example]
    multiple_choice: bool  # scored by choice log-likelihoods (else by generation)
    template: str = "Q: {input}\nA: "  # {input}: the example's input; {choices}: its choices
    separator: str = "\n\n"  # between demonstrations and before the query
    prefix: str = ""  # before the first demonstration (BIG-bench's task_prefix)
    choice_prefix: str = BIGBENCH_CHOICE_PREFIX  # before each choice where {choices} stands
    metrics: list[str] | None = None  # implemented metrics to compute (None: the kind's)
    unimplemented: list[str] = field(default_factory=list)  # the file's other metrics
    stop_string: str | None = None  # generation: cut after this string (BIG-bench)
    output_regex: str | None = None  # generation: the answer is the first match (BIG-bench)
    strip: bool = False  # generation: compare stripped strings (our JSONL convention)
    name: str = ""

    def __post_init__(self):
        if not self.name:
            self.name = task_name(self.path)
        if self.metrics is None:
            self.metrics = ["multiple_choice_grade" if self.multiple_choice else "exact_str_match"]


def task_name(path: Path) -> str:
    """``task`` for .../task/task.json, ``task:subtask`` for a subtask (BIG-bench's naming),
    the file's stem for a .jsonl."""
    if path.name != "task.json":
        return path.stem
    if (path.parent.parent / "task.json").is_file():
        return f"{path.parent.parent.name}:{path.parent.name}"
    return path.parent.name


def _fail(where: str, what: str):
    raise ValueError(f"{where}: {what}")


def decode_utf8(data: bytes, name: str, what: str = "task files") -> str:
    """``data`` (read from ``name``) as text, a UTF-8 byte-order mark dropped; bytes that are
    not UTF-8 are a one-line ValueError naming ``name``, the line and the byte; ``what`` names
    the kind of file in the advice."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        utf16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")  # a UTF-16 byte-order mark
        raise ValueError(
            f"{name}: not UTF-8 text{' (it looks like UTF-16)' if utf16 else ''}: byte "
            f"0x{data[err.start]:02x} at line {line} (offset {err.start}): {err.reason}; {what} "
            f"must be UTF-8: convert it, e.g. iconv -f {'utf-16' if utf16 else 'latin1'} -t utf-8"
        ) from None


def read_utf8(path: str | Path, what: str = "task files") -> str:
    """The text of file ``path`` (``decode_utf8``); a file that cannot be read is a one-line
    ValueError naming it too."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror})") from None
    return decode_utf8(data, str(path), what)


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
        scores = [float(i == answer) for i in range(len(choices))]
        return Example(obj["input"], choices=choices, scores=scores)
    if "target" in obj:
        return Example(obj["input"], targets=_string_list(obj["target"], where, "target"))
    _fail(where, 'needs "target" (generative) or "choices" and "answer" (multiple choice)')


_NUMBERS = frozenset((int, float))  # JSON numbers; bool (a subclass of int) is not one


def _finite(values) -> bool:
    try:
        return all(map(math.isfinite, values))  # in C: suites hold millions of scores
    except OverflowError:  # an integer literal beyond a float's range
        return False


def _bigbench_example(obj, where: str, index: int, needs_choices: bool, needs_target: bool):
    # suites hold millions of examples: the checks below stay in C where they can
    if type(obj) is not dict or type(obj.get("input")) is not str:
        _fail(where, 'expected an object with a string "input"')
    target = obj.get("target")
    if target is not None:
        targets = [target] if type(target) is str else _string_list(target, where, "target")
    elif needs_target:
        _fail(where, 'needs "target" (the task is scored by generation)')
    else:
        targets = []
    scores = obj.get("target_scores")
    if scores is None and not needs_choices:
        return Example(obj["input"], targets)
    if type(scores) is not dict or not scores:
        _fail(where, '"target_scores" must map at least one choice to a score')
    values = list(scores.values())
    if not _NUMBERS.issuperset(map(type, values)):
        _fail(where, f'"target_scores" values must be numbers, got {scores!r}')
    if not _finite(values):  # NaN breaks "the highest score", inf every mean
        choice, value = next((c, v) for c, v in scores.items() if not _finite([v]))
        if isinstance(value, int):
            value = f"an integer of {int(value.bit_length() * math.log10(2)) + 1} digits"
        else:  # as JSON spells it (1e400 reads as Infinity)
            value = "NaN" if math.isnan(value) else ("-" if value < 0 else "") + "Infinity"
        _fail(
            where,
            f'"target_scores" value of {choice!r} is {value}; valid: finite numbers (NaN, '
            "Infinity and numbers beyond +-1.8e308 are not scores)",
        )
    if len(values) > 1 and max(values) <= min(values):
        _fail(where, f'"target_scores" has no right choice (all scores equal): {scores!r}')
    return Example(obj["input"], targets, list(scores), list(map(float, values)), True, index)


def _load_jsonl(path: Path) -> Task:
    examples = []
    for n, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            _fail(where, f"not valid JSON ({err.msg})")
        except RecursionError:
            _fail(where, "JSON nested too deeply to be an example")
        example = _jsonl_example(obj, where)
        if examples and bool(example.choices) != bool(examples[0].choices):
            _fail(where, "mixes generative and multiple-choice examples")
        examples.append(example)
    if not examples:
        _fail(str(path), "no examples")
    multiple_choice = bool(examples[0].choices)
    return Task(path, examples, multiple_choice, strip=True)


def subtask_files(path: Path) -> list[Path]:
    """The task.json files in the subdirectories of a container task's directory."""
    return sorted(p for p in path.parent.glob("*/task.json"))


def _bigbench_metrics(data: dict, raw: list, path: Path) -> tuple[list[str], list[str]]:
    metrics = data.get("metrics")
    if metrics is None:  # not a BIG-bench field requirement here: infer from the first example
        first = raw[0] if isinstance(raw[0], dict) else {}
        metrics = ["multiple_choice_grade" if "target_scores" in first else "exact_str_match"]
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        _fail(str(path), f"'metrics' must be a list of metric names, got {metrics!r}")
    return (
        [m for m in metrics if m in IMPLEMENTED_METRICS],
        [m for m in metrics if m not in IMPLEMENTED_METRICS],
    )


def _load_bigbench(path: Path) -> Task:
    try:
        data = json.loads(read_utf8(path))
    except json.JSONDecodeError as err:
        _fail(str(path), f"not valid JSON ({err.msg} at line {err.lineno})")
    except RecursionError:
        _fail(str(path), "JSON nested too deeply to be a task file")
    if isinstance(data, dict) and "examples" not in data and subtask_files(path):
        names = ", ".join(p.parent.name for p in subtask_files(path))
        _fail(str(path), f"a container task without examples; evaluate its subtasks ({names})")
    raw = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(raw, list) or not raw:
        _fail(str(path), 'needs a non-empty "examples" list (BIG-bench task.json)')
    for key in (
        "task_prefix",
        "example_input_prefix",
        "example_output_prefix",
        "choice_prefix",
        "few_shot_example_separator",
        "stop_string",
        "output_regex",
    ):
        if key in data and not isinstance(data[key], str):
            _fail(str(path), f"{key!r} must be a string, got {data[key]!r}")
    metrics, unimplemented = _bigbench_metrics(data, raw, path)
    multiple_choice = any(m in MULTIPLE_CHOICE_METRICS for m in metrics)
    generative = any(m in GENERATIVE_METRICS for m in metrics)
    examples, seen = [], set()
    for i, obj in enumerate(raw):
        ex = _bigbench_example(obj, f"{path}, example {i}", i, multiple_choice, generative)
        key = (ex.input, tuple(ex.targets), tuple(ex.choices), tuple(ex.scores))
        if key not in seen:  # exact duplicates are dropped, as BIG-bench does
            seen.add(key)
            examples.append(ex)
    regex = data.get("output_regex")
    if "output_regex" in data:
        try:
            re.compile(regex)
        except re.error as err:
            _fail(str(path), f"'output_regex' {regex!r} is not a valid regular expression ({err})")
    elif "stop_string" not in data:
        regex = BIGBENCH_OUTPUT_REGEX
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
        metrics=metrics,
        unimplemented=unimplemented,
        stop_string=data.get("stop_string"),
        output_regex=regex,
    )


def load_task(path: str | Path, template: str | None = None, separator: str | None = None) -> Task:
    """Read a ``.jsonl`` task or a BIG-bench ``.json`` task; ``template`` and ``separator``
    replace the file's (or the format's default) formatting. A task none of whose metrics is
    implemented loads with ``metrics == []`` (see ``unimplemented``)."""
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


def find_task_files(spec: str) -> list[Path]:
    """Task files named by ``spec``: a file, a directory (every ``task.json`` and ``.jsonl``
    below it) or a glob pattern (``**`` allowed). Symlinked directories are followed, each
    directory once (a link loop ends). Sorted; ValueError if nothing matches."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [p for p in walk_files(path) if p.name == "task.json" or p.suffix == ".jsonl"]
    else:
        found = [p for p in glob_files(spec) if p.suffix in (".json", ".jsonl")]
    if not found:
        if path.is_dir():
            why = "the directory holds no task.json or .jsonl file"
        elif glob.has_magic(spec):
            why = "the pattern matches no .json or .jsonl file"
        else:
            why = "no such file or directory"
        hint = ""
        if "bigbench" in spec:
            from gpt.data.assets import bigbench_hint

            hint = f"; {bigbench_hint()}"
        raise ValueError(f"--tasks {spec}: no task files (task.json / *.jsonl): {why}{hint}")
    return sorted(set(found))


def select_shots(task: Task, k: int, seed: int, query: int | Example) -> list[Example]:
    """K demonstrations for the query (an index into ``task.examples`` or an example from
    elsewhere), drawn without replacement by a generator seeded with (seed, query index) from
    the other examples, leaving out the query itself and exact copies of it (an example with
    the same input and another answer is a fair demonstration). A query typed by the user
    (an ``Example``) leaves out every example with its input: their answers are unknown."""
    if k < 0:
        raise ValueError(f"--shots must be >= 0, got {k}")
    if k == 0:
        return []
    examples = task.examples
    if isinstance(query, int):
        index, target = query, examples[query]

        def usable(i: int) -> bool:
            return i != index and examples[i] != target
    else:
        index, target = -1, query

        def usable(i: int) -> bool:
            return examples[i].input != target.input

    rng = random.Random(f"{seed}:{index}")
    # a few spare draws cover the query and its copies without scanning a large task
    draws = rng.sample(range(len(examples)), min(len(examples), k + 8))
    picked = [i for i in draws if usable(i)]
    if len(picked) < k:  # many excluded: draw from the whole pool (same generator, reseeded)
        pool = [i for i in range(len(examples)) if usable(i)]
        if k > len(pool):
            raise ValueError(
                f"--shots {k} needs {k} examples besides the query; {task.path} has {len(pool)}"
            )
        picked = random.Random(f"{seed}:{index}").sample(pool, k)
    return [examples[i] for i in picked[:k]]


def format_query(task: Task, example: Example) -> str:
    """The template filled with the example (what the model continues with the answer)."""
    values = {
        "input": example.input,
        "choices": "".join(task.choice_prefix + c for c in example.listed),
    }
    # one pass, so that an input or choice containing "{choices}" is left alone
    return re.sub(r"\{(input|choices)\}", lambda m: values[m.group(1)], task.template)


def build_prompt(task: Task, query: Example, shots: list[Example]) -> str:
    """prefix + demonstrations (query text + answer) + the query, joined by the separator."""
    demos = [format_query(task, s) + s.answer for s in shots]
    return task.prefix + task.separator.join([*demos, format_query(task, query)])
