"""What a user gets outside the repository: defaults relative to the working directory, and the migrations and an
example manifest shipped with the package for when the working directory has none."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from abstream.config import REPO_ROOT, Settings, shipped


def test_defaults_are_relative_to_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests.json").write_text('{"version": 1}')
    (tmp_path / "clickhouse").mkdir()
    settings = Settings.from_env({})
    assert settings.manifest_file == Path("tests.json") and settings.manifest_file.resolve().parent == tmp_path
    assert settings.migrations_path.resolve() == tmp_path / "clickhouse"
    assert Path(settings.data_dir) == Path(".abstream-data")


def test_an_absent_default_falls_back_to_the_shipped_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({})
    assert settings.manifest_file == shipped("tests.json") and settings.manifest_file.is_file()
    assert settings.migrations_path == shipped("clickhouse") and any(settings.migrations_path.glob("0001_*.sql"))
    # a path the user set is never replaced: a typo must fail loudly, naming it
    assert Settings.from_env({"ABSTREAM_MANIFEST": "missing.json"}).manifest_file == Path("missing.json")


def test_the_wheel_ships_the_migrations_an_example_manifest_and_the_licence() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    data = project["tool"]["setuptools"]["data-files"]
    assert data["share/abstream"] == ["tests.json"] and data["share/abstream/clickhouse"] == ["clickhouse/*.sql"]
    assert project["project"]["license"] == "Apache-2.0"
    assert (
        "Apache License" in (REPO_ROOT / "LICENSE").read_text() and "Version 2.0" in (REPO_ROOT / "LICENSE").read_text()
    )
