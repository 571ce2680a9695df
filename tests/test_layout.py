"""The repository's layout against what is installed: no top-level folder or module of ours
hides an installed distribution or a standard-library module when the root is on sys.path
(as it is for every command run from the root), and the package imports as `gpt.kernels` /
`gpt.data` from the root, from another directory, and from a built wheel (pyproject.toml
says how)."""

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OWN = {"gpt-pretrain", "gpt_pretrain"}
ENTRY_SCRIPTS = {"train", "sample"}  # the documented entry points, run as scripts


def run(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env
    )


def taken_names() -> set[str]:
    """Top-level names of installed distributions other than ours, and standard modules."""
    dists = md.packages_distributions()
    return {n for n, d in dists.items() if not set(d) <= OWN} | set(sys.stdlib_module_names)


def root_names() -> list[str]:
    """Every name `import NAME` could resolve to in the root: folders and .py modules."""
    names = []
    for entry in sorted(ROOT.iterdir()):
        name = entry.name[:-3] if entry.suffix == ".py" else entry.name
        if entry.is_dir() or entry.suffix == ".py":
            if name.isidentifier() and name not in ENTRY_SCRIPTS:
                names.append(name)
    return names


def test_no_regular_package_or_module_at_the_root_shadows_an_installed_name():
    """A folder with __init__.py or a .py module at the root beats site-packages: none may
    carry the name of an installed distribution's top-level package or of a standard module.
    (A folder without __init__.py is a namespace portion, which any installed package beats.)"""
    shadowing = [
        name
        for name in root_names()
        if name in taken_names()
        and ((ROOT / name / "__init__.py").exists() or (ROOT / f"{name}.py").exists())
    ]
    assert not shadowing, f"regular packages or modules at {ROOT} hide installed ones: {shadowing}"


def test_installed_names_resolve_to_site_packages_from_the_root():
    """The check as a user meets it: from the root, each root name that is also installed or
    standard resolves to the installed one. `kernels` must be among them: transformers
    depends on it, and our `kernels/` folder once hid it."""
    assert "kernels" in md.packages_distributions(), (
        "the `kernels` distribution is not installed: this check needs it (requirements/lock.txt)"
    )
    names = sorted(set(root_names()) & taken_names())
    code = (
        "import importlib.util\n"
        f"for name in {names!r}:\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    print(name, spec.origin or ' '.join(spec.submodule_search_locations or []))\n"
    )
    out = run(code, ROOT)
    assert out.returncode == 0, out.stderr
    found = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert "kernels" in found, out.stdout
    for name, where in found.items():
        ours = (ROOT / name).resolve()
        assert not Path(where).resolve().is_relative_to(ours), f"`import {name}` gets {where}"


def test_transformers_and_the_kernels_distribution_import_from_the_root():
    out = run(
        "import kernels\n"
        "from transformers import GPT2LMHeadModel, LlamaForCausalLM\n"
        "print(kernels.__file__)",
        ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "site-packages" in out.stdout, out.stdout


def test_root_folders_without_a_distribution_are_empty_namespaces():
    """`data` is not installed: from the root `import data` gives at most an empty namespace
    (no __init__ ran, nothing to import from it), and the metadata says not installed."""
    out = run(
        "import importlib.metadata as md, data\n"
        "assert getattr(data, '__file__', None) is None, data.__file__\n"
        "try:\n"
        "    md.version('data')\n"
        "except md.PackageNotFoundError:\n"
        "    print('not installed')\n"
        "try:\n"
        "    from data import prepare_everything\n"
        "except ImportError:\n"
        "    print('nothing to import')\n",
        ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["not installed", "nothing to import"]


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_package_entry_points_from_the_root_and_elsewhere(where, tmp_path):
    cwd = ROOT if where == "root" else tmp_path
    for module in ("gpt.data.prepare", "gpt.kernels.warmup"):
        out = subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=cwd, capture_output=True, text=True
        )
        assert out.returncode == 0 and out.stdout.startswith("usage:"), (module, out.stderr)
    out = run("import gpt.data.loader, gpt.kernels.flash_attention, gpt; print(gpt.__file__)", cwd)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(ROOT / "gpt" / "__init__.py")


def test_links_name_the_root_folders():
    for name in ("kernels", "data"):
        link = ROOT / "gpt" / name
        assert link.is_symlink() and link.readlink() == Path("..") / name, link
        assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py would shadow"


@pytest.mark.slow
def test_wheel_holds_the_whole_package_and_runs_from_another_directory(tmp_path):
    """`pip install .`'s wheel: gpt.kernels and gpt.data inside it as files (not links), and
    nothing else at the top level; run from another directory it imports from itself."""
    leftovers = not (ROOT / "build").exists()  # setuptools builds in the source tree
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--wheel-dir", str(tmp_path / "wheel"), str(ROOT)],
        capture_output=True,
        text=True,
    )
    if leftovers:
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {
        "gpt",
        wheel.name.split("-")[0] + "-0.1.0.dist-info",
    }
    for module in ("kernels/flash_attention.py", "data/prepare.py", "data/loader.py"):
        assert f"gpt/{module}" in names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = "import gpt.data.prepare, gpt.kernels.warmup, gpt; print(gpt.__file__)"
    out = run(code, tmp_path, env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "site" / "gpt" / "__init__.py")
    out = subprocess.run(
        [sys.executable, "-m", "gpt.data.prepare", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr


def layout_rows() -> list[tuple[str, str]]:
    """(path cell, what cell) of each row of the README's layout table."""
    import re

    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| `")]
    assert rows, "README.md: no layout table under ## Layout"
    return [(re.sub(r"\s+", " ", p).strip(), w.strip()) for p, w in rows]


def test_every_path_the_readme_layout_table_names_exists():
    import re

    for paths, what in layout_rows():
        folders = [p for p in re.findall(r"`([^`]+)`", paths) if p.endswith("/")]
        for path in re.findall(r"`([^`]+)`", paths):
            assert (ROOT / path).exists(), f"README.md layout table: {path} does not exist"
        for name in re.findall(r"`([\w/.-]+\.(?:py|sh))`", what):
            where = [ROOT / f / name for f in folders] or [ROOT / name]
            assert any(p.exists() for p in where), f"README.md layout table: {name} in {paths}"


def test_every_module_of_the_core_folders_is_in_the_readme_layout_table():
    """A module added to gpt/, gpt/train/ or kernels/ gets a line in the layout table."""
    rows = layout_rows()
    text = " ".join(p + " " + w for p, w in rows)
    for folder in ("gpt", "gpt/train", "kernels", "bench", "recipes"):
        row = " ".join(w for p, w in rows if p == f"`{folder}/`")
        for module in sorted((ROOT / folder).glob("*.py")):
            if module.name == "__init__.py":
                continue
            named = f"`{folder}/{module.name}`" in text or f"`{module.name}`" in row
            assert named, f"README.md layout table does not name {folder}/{module.name}"
