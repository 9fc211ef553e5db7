"""Committed reports and package files name no machine's folders, and display_path is how
reports write a filesystem path (relative to the current folder, or with "~" for home)."""

import os
from pathlib import Path

import pytest

from coralline.bench.report import display_path

ROOT = Path(__file__).resolve().parents[1]  # the checkout
SCANNED = ("bench/results", "services/coralline")
SUFFIXES = {".json", ".jsonl", ".md", ".py"}
SKIP_DIRS = {"__pycache__", "_proto"}  # build outputs (git-ignored)
MACHINE = ("/work/", "/root/")


def _text_files():
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            rel = path.relative_to(ROOT)
            if path.is_file() and path.suffix in SUFFIXES and not SKIP_DIRS & set(rel.parts):
                yield rel


def test_no_committed_file_names_a_machine_folder():
    files = list(_text_files())
    assert any(f.parts[0] == "bench" for f in files) and any(f.suffix == ".py" for f in files)
    bad = [
        f"{f}: {needle!r}"
        for f in files
        for needle in MACHINE
        if needle in (ROOT / f).read_text(encoding="utf-8", errors="replace")
    ]
    assert not bad, "machine-specific paths in:\n" + "\n".join(bad)


@pytest.fixture
def places(tmp_path, monkeypatch):
    """A current folder and a home folder, apart from each other and from the package."""
    cwd, home = tmp_path / "checkout", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    return cwd, home


def test_display_path_inside_the_current_folder_is_relative(places):
    cwd, _ = places
    assert display_path(cwd / "services" / "coralline" / "data" / "head") == (
        "services/coralline/data/head"
    )
    assert display_path(str(cwd / "bench" / "out")) == "bench/out"


def test_display_path_under_home_starts_with_a_tilde(places):
    _, home = places
    run = home / ".cache" / "coralline" / "runs" / "abl2-eagle"
    assert display_path(run) == "~/.cache/coralline/runs/abl2-eagle"
    assert display_path(str(run)).startswith("~")


def test_display_path_elsewhere_or_relative_is_unchanged(places):
    elsewhere = os.path.join(os.sep, "nonexistent-coralline-test", "ckpt")
    assert display_path(elsewhere) == elsewhere
    assert display_path("some/relative/folder") == "some/relative/folder"
    assert display_path("smollm2-135m-instruct") == "smollm2-135m-instruct"  # a name, not a path
    assert display_path(None) == "None"  # no checkpoint, as str() wrote it before


def test_display_path_of_the_shipped_head_is_inside_the_package(places):
    from coralline.draft.registry import shipped_head

    head = shipped_head("smollm2-135m-instruct")
    if head is None:
        pytest.skip("no shipped head for smollm2-135m-instruct")
    shown = display_path(head)
    assert shown == "coralline/data/coral-smollm2-135m-instruct"  # cwd elsewhere: the import root
