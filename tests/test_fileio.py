"""gpt.fileio: atomic writes leave the old file or the new one, never a part; checksums."""

import os
import stat

import pytest

from gpt import fileio


def test_write_atomic_and_sha256(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    fileio.write_atomic(path, b"abc")
    assert path.read_bytes() == b"abc" and not list(path.parent.glob("*.tmp"))
    # sha256("abc"), FIPS 180-2 appendix B.1
    assert fileio.sha256_file(path).startswith("ba7816bf8f01cfea414140de5dae2223")
    fileio.write_atomic(path, "d\u00e9f")  # text is written as UTF-8
    assert path.read_bytes() == "d\u00e9f".encode()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    fileio.write_atomic(path, "old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        fileio.write_atomic(path, "new")
    assert path.read_text() == "old" and not list(tmp_path.glob("*.tmp"))


def test_an_output_path_that_is_a_device_or_a_link_is_written_through(tmp_path):
    """`--out /dev/null` must not replace the device with a file (renaming over it would),
    and `--out LINK` writes the link's target and keeps the link."""
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a private /dev/null
    fileio.write_output(null, '{"a": 1}\n')
    assert stat.S_ISCHR(null.stat().st_mode) and not list(tmp_path.glob("*.tmp"))
    target = tmp_path / "real.json"
    target.write_text("old")
    (tmp_path / "link.json").symlink_to(target)
    fileio.write_output(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and target.read_text() == "new"
    fileio.write_output(tmp_path / "plain.json", "x")
    assert (tmp_path / "plain.json").read_text() == "x"
    with pytest.raises(IsADirectoryError):
        fileio.write_output(tmp_path, "x")


def test_an_output_path_linked_to_a_device_is_written_to_the_device(tmp_path):
    """/dev/stdout is a link to /proc/self/fd/1, itself a link to a pipe: the device or pipe
    behind a link is written through the path as given."""
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (tmp_path / "out").symlink_to(null)
    fileio.write_output(tmp_path / "out", "x")
    assert stat.S_ISCHR(null.stat().st_mode) and (tmp_path / "out").is_symlink()


def test_a_plot_goes_beside_a_regular_or_new_out_file_only(tmp_path):
    from gpt.fileio import plot_beside

    (tmp_path / "r.json").write_text("{}")
    assert plot_beside(tmp_path / "r.json") == str(tmp_path / "r.png")
    assert plot_beside(tmp_path / "new.json") == str(tmp_path / "new.png")
    assert plot_beside(tmp_path) is None  # a directory
    assert plot_beside("/dev/null") is None  # never /dev/null.png
    assert plot_beside(None) is None and plot_beside("") is None


def test_write_figure_writes_a_png_and_closes_the_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gpt.fileio import write_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert write_figure(fig, tmp_path / "f.png") == tmp_path / "f.png"
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.number not in plt.get_fignums()
