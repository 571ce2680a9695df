"""gpt/train/metrics.py: metrics.jsonl written without partial lines, read back repairing
what a kill or a full disk leaves, and a failed append stopping the run with status 4."""

import errno
import json

import pytest
from runs import config, records

from gpt import report
from gpt.cli import train
from gpt.train import metrics
from gpt.train.metrics import MetricsLog, read_metrics
from gpt.train.trainer import CHECKPOINT_WRITE_EXIT


def test_a_partial_or_damaged_line_is_dropped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 2.0}, "garbage", [1], {"loss": 1.0}, {"step": "2"}]
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    path.write_text(text + '{"step": 3, "lo')  # a kill's partial last line
    assert read_metrics(path) == [{"step": 1, "loss": 2.0}]
    err = capsys.readouterr().err
    assert f"{path}: dropped 5 damaged line(s) (2, 3, 4, 5, 6)" in err


def test_resume_rewrites_the_file_without_the_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    log = MetricsLog(tmp_path, True, resume_step=2)
    log.write({"step": 3, "loss": 1.5})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1}, {"step": 2}, {"step": 3, "loss": 1.5},
    ]  # fmt: skip


def test_a_failed_append_leaves_no_partial_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(tmp_path, True, resume_step=-1)
    log.write({"step": 1})
    real = metrics.os.write

    def half_then_full(fd, data):
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics.os, "write", half_then_full)
    log.write({"step": 2, "loss": 1.0})
    monkeypatch.setattr(metrics.os, "write", real)
    assert "No space left on device" in log.error and str(path) in log.error
    log.write({"step": 3})  # nothing more once it failed
    assert path.read_text() == '{"step": 1}\n'


def test_a_full_disk_while_logging_stops_with_status_4_and_resumes(
    tmp_path, data_dir, monkeypatch, capsys
):
    path, out = config(tmp_path, data_dir)
    real = MetricsLog.write

    def fails_at_step_3(self, record):
        if record["step"] == 3:
            self.error = f"{self.path}: [Errno 28] No space left on device"
        real(self, record)

    monkeypatch.setattr(MetricsLog, "write", fails_at_step_3)
    assert train.main([str(path), "--train.eval_interval=0"]) == CHECKPOINT_WRITE_EXIT
    err = capsys.readouterr().err
    assert "because metrics.jsonl could not be written" in err and "No space left" in err
    assert "after step 4; checkpoint" in err and "step_00000004 saved" in err  # the next vote
    monkeypatch.setattr(MetricsLog, "write", real)
    assert train.main([str(path), "--train.eval_interval=0"]) == 0
    # the records of the steps logged while the disk was full are missing, no more
    assert [r["step"] for r in records(out)] == [1, 2, *range(5, 11)]


def test_the_report_reads_a_partial_or_older_metrics_file(tmp_path, data_dir, capsys):
    path, out = config(tmp_path, data_dir)
    assert train.main([str(path), "--train.max_steps=3", "--train.eval_interval=0"]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": nul')
    older = out.parent / "older"
    older.mkdir()
    for name in ("config.toml", "run.json"):
        (older / name).write_text((out / name).read_text())
    (older / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": "x"}\n')
    capsys.readouterr()
    assert report.main([str(out), "--png", str(tmp_path / "a.png")]) == 0
    assert report.main([str(older), "--png", str(tmp_path / "b.png")]) == 0
    captured = capsys.readouterr()
    assert "dropped 1 damaged line(s) (4)" in captured.err
    assert "run " + str(older) + ": 2 steps, tokens not recorded" in captured.out
    assert "final training loss    3.000" in captured.out
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "nowhere")])


def test_a_metrics_file_that_cannot_be_opened_is_an_error_not_a_traceback(tmp_path):
    log = MetricsLog(tmp_path, True, resume_step=-1)
    (tmp_path / "metrics.jsonl").mkdir()  # replaced by a directory mid-run
    log.write({"step": 1})
    assert "Is a directory" in log.error and "metrics.jsonl" in log.error


def test_a_metrics_file_that_cannot_be_read_at_resume_is_an_error_not_a_traceback(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()
    log = MetricsLog(tmp_path, True, resume_step=3)
    assert "Is a directory" in log.error
