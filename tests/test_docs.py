"""The README stays current with the configuration and opens with the two commands."""

from __future__ import annotations

from pathlib import Path

from abstream.config import REPO_ROOT, settings_table

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_documents_every_setting() -> None:
    missing = [env for env, _, _ in settings_table() if f"`{env}`" not in README]
    assert missing == []


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    head = README.split("```")[1]
    assert "scripts/dev" in head and "scripts/test" in head
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "scripts/test" in ci
    for script in ("scripts/dev", "scripts/test", "scripts/setup", ".ci/run"):
        assert Path(REPO_ROOT / script).stat().st_mode & 0o111, f"{script} must be executable"


def test_readme_configuration_table_is_the_generated_one() -> None:
    """README's table comes from Settings (`python -m abstream.config --readme` rewrites it)."""
    from abstream.config import readme_table

    assert readme_table() in README, "run: .venv/bin/python -m abstream.config --readme"
