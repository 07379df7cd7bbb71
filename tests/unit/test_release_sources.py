"""Where the release matrix's ComfyUI trees come from (scripts/comfyui_releases.sh).

A clone without ../shared must still get every tree: each row that names a local tarball also names
ComfyUI's public git repository at the release's commit, tried when the tarball is not there. A tree
that cannot be had from any source is one ERROR line and exit status 1, never a traceback. These tests
drive the real script on tables of their own (IPADAPTER_RELEASE_TABLE), with a local git repository
standing in for GitHub.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.harness import releases
from tests.harness.comfy_host import REPO

SCRIPT = REPO / "scripts" / "comfyui_releases.sh"
HEADER = "# name source sha256 date expect notes\n"


def git(*args: str, cwd: Path) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.org")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def upstream(tmp_path) -> tuple[Path, str]:
    """A git repository holding a two-commit 'ComfyUI' tree; returns it and the first commit."""
    repo = tmp_path / "upstream"
    repo.mkdir()
    git("init", "-q", cwd=repo)
    (repo / "main.py").write_text("VERSION = 'first'\n", encoding="utf-8")
    git("add", ".", cwd=repo)
    git("commit", "-qm", "first", cwd=repo)
    first = git("rev-parse", "HEAD", cwd=repo)
    (repo / "main.py").write_text("VERSION = 'second'\n", encoding="utf-8")
    git("commit", "-qam", "second", cwd=repo)
    return repo, first


def run_script(tmp_path: Path, rows: str, *names: str) -> subprocess.CompletedProcess:
    table = tmp_path / "table.txt"
    table.write_text(HEADER + rows, encoding="utf-8")
    env = dict(os.environ, IPADAPTER_RELEASE_TABLE=str(table), IPADAPTER_CACHE=str(tmp_path / "cache"),
               IPADAPTER_GIT_TIMEOUT="60")
    return subprocess.run([str(SCRIPT), *names], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "ERROR" in line]


def test_git_fallback_when_the_local_copy_is_missing(tmp_path, upstream):
    repo, first = upstream
    row = f"x  tar:{tmp_path}/absent.tar.gz|git:file://{repo}@{first}  {'0' * 64}  2026-01  pass\n"
    done = run_script(tmp_path, row, "x")
    assert done.returncode == 0, done.stderr
    tree = Path(done.stdout.strip().splitlines()[-1])
    # The pinned commit, not the branch's newest one; no .git left in the tree.
    assert (tree / "main.py").read_text(encoding="utf-8") == "VERSION = 'first'\n"
    assert not (tree / ".git").exists()
    assert (tree / ".release-source").read_text(encoding="utf-8").startswith(f"git:file://{repo}@{first} ")
    again = run_script(tmp_path, row, "x")  # cached: nothing fetched a second time
    assert again.returncode == 0 and "fetching" not in again.stderr and "unpacking" not in again.stderr, again.stderr


def test_local_copy_first_and_checked(tmp_path, upstream):
    repo, first = upstream
    folder = tmp_path / "comfyui-x"
    folder.mkdir()
    (folder / "main.py").write_text("VERSION = 'tarball'\n", encoding="utf-8")
    tarball = tmp_path / "x.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder, arcname="comfyui-x")
    sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
    done = run_script(tmp_path, f"x  tar:{tarball}|git:file://{repo}@{first}  {sha}  2026-01  pass\n", "x")
    assert done.returncode == 0, done.stderr
    tree = Path(done.stdout.strip().splitlines()[-1])
    assert (tree / "main.py").read_text(encoding="utf-8") == "VERSION = 'tarball'\n"

    # A local copy whose checksum differs is an error, not a reason to fetch something else.
    (tmp_path / "w").mkdir()
    wrong = run_script(tmp_path / "w", f"x  tar:{tarball}|git:file://{repo}@{first}  {'1' * 64}  2026-01  pass\n", "x")
    assert wrong.returncode == 1 and len(error_lines(wrong.stderr)) == 1, wrong.stderr
    assert "sha256" in error_lines(wrong.stderr)[0] and "Traceback" not in wrong.stderr


def test_a_tree_that_cannot_be_had_is_one_clear_line(tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    row = f"x  tar:{tmp_path}/absent.tar.gz|git:file://{tmp_path}/no-such-repo@{commit}  {'0' * 64}  2026-01  pass\n"
    done = run_script(tmp_path, row, "x")
    assert done.returncode == 1
    errors = error_lines(done.stderr)
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    line = errors[0]
    assert "ComfyUI x cannot be had" in line and "absent.tar.gz" in line and "no-such-repo" in line, line

    # The release matrix turns it into a one-line test failure (releases.TreeUnavailable), not a traceback.
    monkeypatch.setenv("IPADAPTER_RELEASE_TABLE", str(tmp_path / "table.txt"))
    monkeypatch.setenv("IPADAPTER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(releases.TreeUnavailable) as caught:
        releases.ensure_tree(releases.Release("x", "tar:a", "0" * 64, "2026-01", "pass"))
    assert str(caught.value) == line.strip(), caught.value


def test_every_local_copy_has_a_public_source_beside_it():
    """The shipped table: a clone without ../shared can fetch every tree (wheels come from PyPI)."""
    for row in releases.releases():
        sources = row.source.split("|")
        local = [s for s in sources if s.startswith("tar:") and "../shared/" in s]
        if local:
            assert any(s.startswith("git:https://github.com/") for s in sources), (
                f"{row.name}: only a local copy ({local[0]}); add git:<ComfyUI's repository>@<commit> after it")
        for source in sources:
            assert releases.SOURCE.fullmatch(source), source
