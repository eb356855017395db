"""`tda submit` and friends without a cluster: address and token resolution, the store check, what
is shipped, and reading failed steps from a log. The cluster itself is tests/cluster (make test-cluster).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipelines import jobs
from pipelines.errors import ClusterError, SpecError
from pipelines.spec import loads_spec

SPEC = """
version: 1
name: small
run:
  store: {store}
steps:
  wine:
    kind: read
    path: {path}
"""


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in (
        "RAY_API_SERVER_ADDRESS",
        "RAY_ADDRESS",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_AUTH_MODE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TDA_STORE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_the_address_comes_from_the_flag_then_the_environment(clean_env: Path, monkeypatch) -> None:
    with pytest.raises(ClusterError, match="--address http://HEAD:8265"):
        jobs.resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # not an HTTP address: the Jobs API needs one
    with pytest.raises(ClusterError):
        jobs.resolve_address(None)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert jobs.resolve_address(None) == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert jobs.resolve_address(None) == "http://api:8265"
    assert jobs.resolve_address("http://flag:8265") == "http://flag:8265"


def test_the_token_follows_rays_order_of_sources(clean_env: Path, monkeypatch) -> None:
    home_token = clean_env / ".ray" / "auth_token"
    home_token.parent.mkdir()
    home_token.write_text("home\n")
    assert jobs.auth_token() is None  # ~/.ray/auth_token only counts with RAY_AUTH_MODE=token
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert jobs.auth_token() == "home"
    path_token = clean_env / "path_token"
    path_token.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path_token))
    assert jobs.auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.auth_token() == "from-env"
    flag = clean_env / "flag_token"
    flag.write_text(" from-flag \n")
    assert jobs.auth_token(str(flag)) == "from-flag"
    with pytest.raises(ClusterError, match="--token-file .*missing"):
        jobs.auth_token(str(clean_env / "missing"))


def test_a_job_needs_a_store_every_node_sees(clean_env: Path, monkeypatch) -> None:
    data = clean_env / "wine.csv"
    data.write_text("a,b\n1,2\n")
    relative = loads_spec(SPEC.format(store="./tda-store", path=data), str(clean_env / "spec.yaml"))
    with pytest.raises(SpecError) as err:
        jobs.cluster_store(relative, None)
    (line,) = str(err.value).splitlines()
    assert "run.store" in line and "--store" in line and "TDA_STORE" in line
    assert jobs.cluster_store(relative, "/shared/store") == "/shared/store"
    assert jobs.cluster_store(relative, "s3://bucket/store") == "s3://bucket/store"
    monkeypatch.setenv("TDA_STORE", "/mnt/tda")
    assert jobs.cluster_store(relative, None) == "/mnt/tda"
    monkeypatch.delenv("TDA_STORE")
    absolute = loads_spec(SPEC.format(store="/mnt/store", path=data), str(clean_env / "spec.yaml"))
    assert jobs.cluster_store(absolute, None) == "/mnt/store"


def test_the_project_is_the_folder_with_pyproject_and_git_ignored_files_stay_home(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "specs").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[project]\nname='x'\n")
    spec = project / "specs" / "s.yaml"
    spec.write_text("")
    assert jobs.project_root(spec) == project
    lone = tmp_path / "lone" / "s.yaml"
    lone.parent.mkdir()
    lone.write_text("")
    assert jobs.project_root(lone) == lone.parent
    assert jobs.git_ignored(project) == []  # not a git checkout
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    (project / ".gitignore").write_text("big/\n")
    (project / ".git" / "info" / "exclude").write_text("private.bin\n")
    (project / "big").mkdir()
    (project / "big" / "x").write_text("x")
    (project / "private.bin").write_text("x")
    (project / "specs" / "kept.csv").write_text("x")
    assert sorted(jobs.git_ignored(project)) == ["/big/", "/private.bin"]


def test_inputs_outside_the_project_are_flagged(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    outside = tmp_path / "elsewhere.csv"
    outside.write_text("a\n1\n")
    spec = loads_spec(SPEC.format(store="/s", path=outside), str(project / "spec.yaml"))
    (warning,) = jobs._outside_project(spec, project)
    assert warning.startswith("steps.wine.path:") and "every node must see it" in warning
    inside = project / "wine.csv"
    inside.write_text("a\n1\n")
    spec = loads_spec(SPEC.format(store="/s", path="wine.csv"), str(project / "spec.yaml"))
    assert list(jobs._outside_project(spec, project)) == []


def test_failed_steps_are_read_from_the_log_when_the_store_is_out_of_reach() -> None:
    log = "\n".join(
        [
            "[   12.0s] effects: done (960 rows)",
            'check failed: ColumnNotFoundError: unable to find column "x"',
            "lds failed: an upstream step failed",
            "store:    /mnt/store",
        ]
    )
    assert jobs.failed_steps_from_log(log) == {
        "check": 'ColumnNotFoundError: unable to find column "x"',
        "lds": "an upstream step failed",
    }


def test_unreachable_cluster_is_one_line(clean_env: Path) -> None:
    with pytest.raises(ClusterError) as err:
        jobs.connect("http://127.0.0.1:9")  # the discard port: nothing listens
    (line,) = str(err.value).splitlines()
    assert "http://127.0.0.1:9" in line
