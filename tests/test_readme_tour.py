"""README's "Experiment results in five minutes", run as written against `abstream dev`.

The tour's shell block is split into commands (a command ends where ``bash -n`` accepts the lines so far) and
run in one bash, one after another, as a reader pastes them: real curl, python3 and `.venv/bin/abstream`. The
shell is one whose environment points at this stack (``ABSTREAM_GATEWAY_PORT``, ``CLICKHOUSE_URL``: what
`abstream dev` prints for other shells), started in a directory holding the stack's ``.abstream-data`` and a
``.venv`` link to this interpreter's environment, as the repository's root does.

Every command is checked by exactly one entry of ``CHECKS`` (its pattern matches the command's first line): a
command without a check, or a check without a command, fails, so the README and this file change together.
A failure names the README line, the command, its exit code and its output.

The block whose first line is ``# needs Docker`` (Grafana under docker compose) is not run: the machine running
the tests may have no Docker. What it claims is checked against docker-compose.yml instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from abstream.config import REPO_ROOT
from abstream.devstack.ports import free_port

README = REPO_ROOT / "README.md"
SECTION = "## Experiment results in five minutes"
DOCKER_MARK = "# needs Docker"
USERS = 201  # u1, then the loop's u2..u201


@dataclass
class Command:
    line: int
    """README line of the command's first line."""
    text: str
    rc: int | None = None
    output: str = ""

    @property
    def head(self) -> str:
        return self.text.splitlines()[0]

    def where(self) -> str:
        return f"README.md line {self.line}: {self.head}\n  exit code: {self.rc}\n  output: {self.output[:3000]!r}"


def tour_blocks() -> list[tuple[int, list[str]]]:
    """The ```sh blocks of the tour section: (README line of the block's first line, its lines)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index(SECTION)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    blocks: list[tuple[int, list[str]]] = []
    i = start
    while i < end:
        if lines[i].strip() == "```sh":
            close = lines.index("```", i + 1)
            blocks.append((i + 2, lines[i + 1 : close]))
            i = close
        i += 1
    return blocks


def executed_and_docker_blocks() -> tuple[list[tuple[int, list[str]]], list[tuple[int, list[str]]]]:
    blocks = tour_blocks()
    docker = [b for b in blocks if b[1] and b[1][0].startswith(DOCKER_MARK)]
    return [b for b in blocks if b not in docker], docker


def split_commands(first_line: int, lines: list[str]) -> list[Command]:
    """One command per complete shell statement: lines accumulate until ``bash -n`` accepts them.
    Blank and comment-only lines between commands are left out."""
    commands: list[Command] = []
    pending: list[str] = []
    start = 0
    for offset, line in enumerate(lines):
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if not pending:
            start = first_line + offset
        pending.append(line)
        text = "\n".join(pending)
        if subprocess.run(["bash", "-n", "-c", text], capture_output=True).returncode == 0:
            commands.append(Command(start, text))
            pending = []
    assert not pending, f"README.md line {start}: the tour's block ends inside a command: {pending[0]}"
    return commands


def run_in_one_shell(commands: list[Command], cwd: Path, env: dict[str, str], timeout: float = 120) -> None:
    """Run the commands in one bash, in order, each one's stdout and stderr captured between markers."""
    mark = f"@@tour-{uuid.uuid4().hex}@@"
    script = [f"MARK={mark}"]
    for i, cmd in enumerate(commands):
        script += [
            f"printf '\\n%s %d start\\n' $MARK {i}",
            "{",
            cmd.text,
            "} 2>&1",
            "__rc=$?",
            f"printf '\\n%s %d rc=%d\\n' $MARK {i} $__rc",
        ]
    path = cwd / "tour.sh"
    path.write_text("\n".join(script) + "\n")
    done = subprocess.run(
        ["bash", str(path)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    out = done.stdout
    for i, cmd in enumerate(commands):
        found = re.search(rf"{re.escape(mark)} {i} start\n(.*?)\n{re.escape(mark)} {i} rc=(\d+)\n", out, re.S)
        if found is None:
            cmd.output = out[-3000:]
            raise AssertionError(f"the tour's shell stopped before this command ended\n{cmd.where()}")
        cmd.output, cmd.rc = found.group(1).strip(), int(found.group(2))


# ---- the stack ---------------------------------------------------------------------------------------------


@dataclass
class Stack:
    gateway: str
    env: dict[str, str]
    """The tour's shell environment."""
    home: Path
    """Where the tour runs: holds ``.abstream-data`` (the stack's data) and ``.venv``."""


@pytest.fixture(scope="module")
def dev_stack() -> Iterator[Stack]:
    """`abstream dev` on free ports, run in a temporary directory (its data in ``.abstream-data`` there)."""
    if not (shutil.which("bash") and shutil.which("curl")):
        pytest.skip("the README tour needs bash and curl on PATH")
    home = Path(tempfile.mkdtemp(prefix="abstream-tour-"))
    (home / ".venv").symlink_to(Path(sys.prefix))  # `.venv/bin/abstream`, as at the repository's root
    ports = {
        "ABSTREAM_BROKER_PORT": free_port(),
        "ABSTREAM_CLICKHOUSE_PORT": free_port(),
        "ABSTREAM_GATEWAY_PORT": free_port(),
        "ABSTREAM_WORKER_WEB_PORT": free_port(),
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ABSTREAM_", "KAFKA_", "CLICKHOUSE_"))}
    # A shell set up for this stack: the ports, and the addresses `abstream dev` says other commands need.
    shell = {
        **clean,
        **{k: str(v) for k, v in ports.items()},
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{ports['ABSTREAM_BROKER_PORT']}",
        "CLICKHOUSE_URL": f"http://default:@127.0.0.1:{ports['ABSTREAM_CLICKHOUSE_PORT']}",
        # python3 for the tour's id extraction: this interpreter's, whatever the machine's PATH holds
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{clean.get('PATH', '')}",
    }
    dev_env = {
        **shell,
        "ABSTREAM_MANIFEST": str(REPO_ROOT / "tests.json"),
        "ABSTREAM_MIGRATIONS_DIR": str(REPO_ROOT / "clickhouse"),
    }
    log = home / "dev.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "abstream.cli", "dev"], cwd=home, env=dev_env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 90
        while "healthy in" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"abstream dev exited ({proc.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"abstream dev not healthy in 90 s:\n{log.read_text()}"
            time.sleep(0.2)
        yield Stack(f"http://127.0.0.1:{ports['ABSTREAM_GATEWAY_PORT']}", shell, home)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(home, ignore_errors=True)


# ---- what each command must print --------------------------------------------------------------------------

Check = Callable[[Command, dict[str, Any]], None]


def _json(cmd: Command) -> Any:
    try:
        return json.loads(cmd.output)
    except ValueError:
        raise AssertionError(f"not one JSON document\n{cmd.where()}") from None


def silent(cmd: Command, ctx: dict[str, Any]) -> None:
    assert cmd.output == "", f"expected no output\n{cmd.where()}"


def created(cmd: Command, ctx: dict[str, Any]) -> None:
    test = _json(cmd)
    assert isinstance(test, dict) and isinstance(test.get("id"), int), f"no test id\n{cmd.where()}"
    assert [v["variant_name"] for v in test["variants"]] == ["grey", "green"], cmd.where()
    assert [m["key"] for m in test["metrics"]] == ["bought", "revenue"], cmd.where()
    ctx["id"] = test["id"]


def assigned(cmd: Command, ctx: dict[str, Any]) -> None:
    body = _json(cmd)
    assert body.get("test_id") == ctx["id"] and body.get("assigned") is True, cmd.where()
    assert body.get("variant_name") in ("grey", "green"), cmd.where()


def accepted_one(cmd: Command, ctx: dict[str, Any]) -> None:
    body = _json(cmd)
    assert body.get("accepted") == 1 and body.get("rejected") == 0, cmd.where()


def results_body(cmd: Command, ctx: dict[str, Any]) -> None:
    body = _json(cmd)
    assert body.get("test_id") == ctx["id"], cmd.where()
    assert body["total_exposed_users"] >= 1, cmd.where()
    assert [m["key"] for m in body["metrics"]] == ["bought", "revenue"], cmd.where()
    assert [v["variant_name"] for v in body["variants"]] == ["grey", "green"], cmd.where()


def results_table(cmd: Command, ctx: dict[str, Any]) -> None:
    for expected in ("checkout button", f"id {ctx['id']}", "exposed users", "bought", "revenue", "A*", "┃ variant"):
        assert expected in cmd.output, f"{expected!r} not in the table\n{cmd.where()}"


def summary(cmd: Command, ctx: dict[str, Any]) -> None:
    body = _json(cmd)
    assert ctx["id"] in [e["experiment_id"] for e in body["running_experiments"]], cmd.where()


def experiments(cmd: Command, ctx: dict[str, Any]) -> None:
    body = _json(cmd)
    assert [e["experiment_id"] for e in body["experiments"]] == [ctx["id"]], cmd.where()


# (what, pattern of the command's first line, check): the first matching entry checks the command
CHECKS: list[tuple[str, str, Check]] = [
    ("variables", r"^(B|ADMIN|METRICS|J)=", silent),
    ("create the test", r'^T=\$\(curl .*"\$B/apiv1/ab-tests"', silent),
    ("show the created test", r'^echo "\$T"$', created),
    ("take its id", r"^ID=\$\(", silent),
    ("assign u1", r'^curl .*/assign".*"u1"', assigned),
    ("send an event", r'^curl .*"\$B/apiv1/events"', accepted_one),
    ("track a value", r'^curl .*/track"', accepted_one),
    ("more users, quietly", r"^for i in ", silent),
    ("wait for the workers", r"^sleep \d", silent),
    ("results over HTTP", r"^curl .*/results\?", results_body),
    ("abstream results", r'^\.venv/bin/abstream results "\$ID"', results_table),
    ("metrics summary", r"^curl .*/v1/metrics/summary", summary),
    ("metrics experiments", r"^curl .*/v1/metrics/experiments.*Bearer \$METRICS", experiments),
]


def check_for(cmd: Command) -> tuple[str, Check]:
    for what, pattern, check in CHECKS:
        if re.search(pattern, cmd.head):
            return what, check
    raise AssertionError(f"README.md line {cmd.line}: no check for `{cmd.head}`: add one to CHECKS")


def test_every_tour_command_has_a_check_and_every_check_a_command() -> None:
    executed, _ = executed_and_docker_blocks()
    commands = [c for line, lines in executed for c in split_commands(line, lines)]
    used = {check_for(c)[0] for c in commands}
    assert [what for what, _, _ in CHECKS if what not in used] == [], "checks whose command left the README"


def test_readme_tour_runs_as_written(dev_stack: Stack) -> None:
    executed, _ = executed_and_docker_blocks()
    assert executed, f"no ```sh block under {SECTION!r}"
    commands = [c for line, lines in executed for c in split_commands(line, lines)]
    run_in_one_shell(commands, dev_stack.home, dev_stack.env)
    ctx: dict[str, Any] = {}
    for cmd in commands:
        _, check = check_for(cmd)
        if cmd.rc != 0:
            pytest.fail(f"the command failed\n{cmd.where()}")
        check(cmd, ctx)

    # What the loop says it does: USERS users in all, green buying more often than grey (every 2nd vs every 4th).
    def current() -> dict[str, Any]:
        with urllib.request.urlopen(f"{dev_stack.gateway}/apiv1/ab-tests/{ctx['id']}/results", timeout=10) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    deadline = time.monotonic() + 20
    body = current()
    while body["total_exposed_users"] < USERS and time.monotonic() < deadline:
        time.sleep(0.5)
        body = current()
    assert body["total_exposed_users"] == USERS, body
    bought = {v["variant_key"]: v for v in body["metrics"][0]["variants"]}
    grey, green = bought["A"], bought["B"]
    assert 0.2 < grey["conversion_rate"] < 0.3 and 0.45 < green["conversion_rate"] < 0.6, bought
    assert green["vs_control"]["p_value"] is not None, "the tour's users are enough for figures, not null ones"


def test_dashboards_block_is_marked_not_run_and_matches_compose() -> None:
    """The Grafana step needs Docker: one block, marked on its first line, not run; its ports are compose's."""
    executed, docker = executed_and_docker_blocks()
    assert len(docker) == 1, f"one block starting {DOCKER_MARK!r} expected"
    text = "\n".join(docker[0][1])
    assert "docker compose up" in text and "http://localhost:3000" in text
    assert all("docker" not in line for _, lines in executed for line in lines), "Docker lines in a run block"
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    assert '"3000:3000"' in compose and '"20000:20000"' in compose and '"127.0.0.1:8123:8123"' in compose
