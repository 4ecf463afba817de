"""docker-compose.yml, Dockerfile and Grafana provisioning agree with each other and with config.

No Docker engine is needed: the files are parsed and cross-checked, so a renamed setting, a moved
port or a mismatched password fails here instead of at the first ``docker compose up``. The ClickHouse init
script that creates Grafana's read-only user is run with a stand-in clickhouse-client, and the SQL it would
send is parsed by the test stack's ClickHouse.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from abstream.clickhouse import client as ch_client
from abstream.config import Settings, settings_table

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DATASOURCE = ROOT / "grafana" / "provisioning" / "datasources" / "clickhouse.yml"
DASHBOARD_PROVIDER = ROOT / "grafana" / "provisioning" / "dashboards" / "abstream.yml"

APP_SERVICES = ("migrate", "gateway", "worker")
EXPECTED_SERVICES = {"kafka", "clickhouse", "grafana", *APP_SERVICES}
ONE_SHOT = {"migrate"}
# Fixed by the clickhouse/clickhouse-server image's config; compose can only map it.
CLICKHOUSE_HTTP_PORT = 8123
# Stand-ins for the secrets compose requires from the host; distinct values, so a place that
# hard-codes a password instead of using the variable shows up as a mismatch.
HOST_ENV = {
    "ABSTREAM_ADMIN_TOKEN": "token-from-host",
    "ABSTREAM_METRICS_TOKEN": "metrics-token-from-host",
    "CLICKHOUSE_PASSWORD": "clickhouse-pw-from-host",
    "GRAFANA_ADMIN_PASSWORD": "grafana-pw-from-host",
    "GRAFANA_CLICKHOUSE_USER": "grafana_reader_from_host",
    "GRAFANA_CLICKHOUSE_PASSWORD": "grafana-reader-pw-from-host",
}

SETTING_ENV_NAMES = {f.metadata["env"] for f in fields(Settings)}
DEFAULTS = {f.name: f.default for f in fields(Settings)}

_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")
_URL = re.compile(r"https?://[^\s'\"]+")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution ($$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e})."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        present = name in env
        unset = not present or (op is not None and op.startswith(":") and env[name] == "")
        if op in (":-", "-"):
            return arg if unset else env[name]
        if op in (":?", "?"):
            if unset:
                raise KeyError(f"required variable {name} is missing: {arg}")
            return env[name]
        if op in (":+", "+"):
            return "" if unset else arg
        return env.get(name, "")

    return _VAR.sub(sub, value)


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), HOST_ENV if env is None else env)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):  # ["KEY=value", ...] form
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def healthcheck_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    return test if isinstance(test, str) else " ".join(test[1:])


def healthcheck_urls(service: dict[str, Any]) -> list[tuple[str, int, str]]:
    found = []
    for url in _URL.findall(healthcheck_command(service)):
        parts = urlsplit(url)
        assert parts.hostname and parts.port, url
        found.append((parts.hostname, parts.port, parts.path))
    return found


def published_ports(service: dict[str, Any]) -> list[tuple[int, int]]:
    """(host port, container port) of every published port, short or long syntax."""
    out = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            out.append((int(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        assert len(parts) in (2, 3), f"publish the port explicitly: {entry!r}"
        out.append((int(parts[-2]), int(parts[-1])))
    return out


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` as {NAME: (host, port)}."""
    out = {}
    for item in value.split(","):
        name, _, address = item.strip().partition("://")
        host, _, port = address.rpartition(":")
        out[name] = (host, int(port))
    return out


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# --- services and their wiring ------------------------------------------------------------


def test_every_expected_service_exists(services: dict[str, Any]) -> None:
    assert EXPECTED_SERVICES <= set(services), EXPECTED_SERVICES - set(services)


def test_app_services_run_the_abstream_image_with_the_right_command(services: dict[str, Any]) -> None:
    images = {services[name].get("image") for name in APP_SERVICES}
    assert len(images) == 1, f"gateway/worker/migrate must share one image: {images}"
    for name in APP_SERVICES:
        assert services[name]["build"]["context"] == ".", name
    commands = {name: services[name]["command"] for name in APP_SERVICES}
    assert commands["migrate"] == ["migrate"]
    assert commands["worker"] == ["worker"]
    # The gateway must bind all interfaces or the published port reaches nothing.
    assert commands["gateway"][0] == "gateway"
    assert commands["gateway"][commands["gateway"].index("--host") + 1] == "0.0.0.0"


def test_app_services_share_one_environment_block() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    assert "x-abstream-env" in raw
    for name in APP_SERVICES:
        assert raw["services"][name]["environment"] == raw["x-abstream-env"], name


def test_app_environment_names_are_real_settings(services: dict[str, Any]) -> None:
    assert {row[0] for row in settings_table()} == SETTING_ENV_NAMES
    for name in APP_SERVICES:
        unknown = set(env_of(services[name])) - SETTING_ENV_NAMES
        assert not unknown, f"{name}: not settings in abstream/config.py: {sorted(unknown)}"


def test_app_environment_parses_into_settings(services: dict[str, Any]) -> None:
    env = env_of(services["gateway"])
    for required in ("KAFKA_BOOTSTRAP_SERVERS", "CLICKHOUSE_URL", "CLICKHOUSE_DATABASE", "ABSTREAM_ADMIN_TOKEN",
                     "ABSTREAM_METRICS_TOKEN"):  # fmt: skip
        assert env.get(required), required
    settings = Settings.from_env(env)  # raises on a value config cannot parse
    assert settings.kafka_enable_idempotence is True, "real Kafka supports idempotent producers"
    assert settings.kafka_replication_factor == 1, "one broker holds one replica"
    assert settings.admin_token == HOST_ENV["ABSTREAM_ADMIN_TOKEN"]
    assert settings.metrics_token == HOST_ENV["ABSTREAM_METRICS_TOKEN"] != settings.admin_token


def test_secrets_have_no_default(compose: dict[str, Any]) -> None:
    for missing in HOST_ENV:
        env = {k: v for k, v in HOST_ENV.items() if k != missing}
        with pytest.raises(KeyError, match=missing):
            load_compose(env)


def test_kafka_bootstrap_matches_the_advertised_listener(services: dict[str, Any]) -> None:
    kafka_env = env_of(services["kafka"])
    host, port = host_port(env_of(services["gateway"])["KAFKA_BOOTSTRAP_SERVERS"])
    assert host == "kafka" and host in services
    advertised = listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
    matching = [name for name, address in advertised.items() if address == (host, port)]
    assert matching, f"no advertised listener is {host}:{port}: {advertised}"
    name = matching[0]
    # The broker must bind the advertised port, speak plaintext on it, and not use it for control.
    assert listeners(kafka_env["KAFKA_LISTENERS"])[name][1] == port
    protocols = dict(p.split(":") for p in kafka_env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert protocols[name] == "PLAINTEXT"
    assert name not in kafka_env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(",")
    assert kafka_env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE") == "false"
    # One broker cannot hold the 3 replicas internal topics default to.
    assert kafka_env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert kafka_env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    command = healthcheck_command(services["kafka"])
    assert "kafka-broker-api-versions.sh" in command and f":{port}" in command


def test_kafka_kraft_quorum_is_itself(services: dict[str, Any]) -> None:
    kafka_env = env_of(services["kafka"])
    assert set(kafka_env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    controller = kafka_env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    node, _, voter = kafka_env["KAFKA_CONTROLLER_QUORUM_VOTERS"].partition("@")
    assert node == kafka_env["KAFKA_NODE_ID"]
    assert host_port(voter) == ("kafka", listeners(kafka_env["KAFKA_LISTENERS"])[controller][1])
    assert kafka_env.get("CLUSTER_ID")
    assert kafka_env["KAFKA_LOG_DIRS"] in {v.split(":")[1] for v in services["kafka"]["volumes"]}


def test_clickhouse_url_matches_the_clickhouse_service(services: dict[str, Any]) -> None:
    url = urlsplit(env_of(services["gateway"])["CLICKHOUSE_URL"])
    ch_env = env_of(services["clickhouse"])
    assert url.scheme == "http"
    assert url.hostname == "clickhouse" and url.hostname in services
    assert url.port == CLICKHOUSE_HTTP_PORT
    assert url.username == ch_env["CLICKHOUSE_USER"]
    assert url.password == ch_env["CLICKHOUSE_PASSWORD"] == HOST_ENV["CLICKHOUSE_PASSWORD"]
    assert env_of(services["gateway"])["CLICKHOUSE_DATABASE"] == ch_env["CLICKHOUSE_DB"]
    assert all(target == CLICKHOUSE_HTTP_PORT for _, target in published_ports(services["clickhouse"]))
    assert ("clickhouse", CLICKHOUSE_HTTP_PORT, "/ping") in healthcheck_urls(services["clickhouse"])
    nofile = services["clickhouse"]["ulimits"]["nofile"]
    assert int(nofile["soft"]) >= 262144 and int(nofile["hard"]) >= 262144


def test_gateway_port_and_health(services: dict[str, Any]) -> None:
    port = DEFAULTS["gateway_port"]
    assert port == 20000
    gateway = services["gateway"]
    assert int(env_of(gateway).get("ABSTREAM_GATEWAY_PORT", port)) == port
    assert (port, port) in published_ports(gateway)
    assert ("127.0.0.1", port, "/health/ready") in healthcheck_urls(gateway)


def test_worker_health_hits_the_faust_web_port(services: dict[str, Any]) -> None:
    worker = services["worker"]
    port = int(env_of(worker).get("ABSTREAM_WORKER_WEB_PORT", DEFAULTS["worker_web_port"]))
    urls = healthcheck_urls(worker)
    assert urls and all(p == port and path.startswith("/health") for _, p, path in urls), urls


def test_every_long_running_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT:
            assert str(service.get("restart", "no")) == "no", f"{name} runs once"
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert service.get("restart") in ("unless-stopped", "always"), name


def test_depends_on_conditions_are_satisfiable(services: dict[str, Any]) -> None:
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: give each dependency a condition"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep}, which has no healthcheck"
            elif condition == "service_completed_successfully":
                assert dep in ONE_SHOT, f"{name} waits for {dep} to exit, but it runs forever"
            else:
                assert condition == "service_started", condition
    # Each app service starts only once its backends answer (and the schema exists).
    for name in ("gateway", "worker"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["kafka"]["condition"] == deps["clickhouse"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["clickhouse"]["condition"] == "service_healthy"


def test_depends_on_has_no_cycle(services: dict[str, Any]) -> None:
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"dependency cycle: {' -> '.join((*path, name))}"
        if name not in done:
            for dep in services[name].get("depends_on") or {}:
                visit(dep, (*path, name))
            done.add(name)

    for name in services:
        visit(name, ())


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith((".", "/", "~")):  # a bind mount, not a named volume
                assert source.startswith("./") and (ROOT / source).exists(), f"{name}: mount {source}"
                continue
            used.add(source)
    assert used <= declared, f"undeclared volumes: {used - declared}"
    assert {"kafka-data", "clickhouse-data", "grafana-data"} <= used


# --- Grafana --------------------------------------------------------------------------------


def grafana_mounts(services: dict[str, Any]) -> dict[str, str]:
    """Container path -> repo-relative host path of Grafana's bind mounts."""
    out = {}
    for volume in services["grafana"]["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = source
    return out


def test_grafana_installs_the_clickhouse_plugin(services: dict[str, Any]) -> None:
    # Grafana >= 11.5: comma-separated <plugin id>@<version>[@<url>]; the _SYNC form installs before start.
    plugins = env_of(services["grafana"])["GF_PLUGINS_PREINSTALL_SYNC"].split(",")
    assert "GF_INSTALL_PLUGINS" not in env_of(services["grafana"]), "deprecated since Grafana 12.1"
    ids = {p.strip().split("@")[0]: p.strip().split("@")[1:] for p in plugins}
    assert ids.get("grafana-clickhouse-datasource", [""])[0], f"the plugin, pinned to a version: {plugins}"
    assert ("127.0.0.1", 3000, "/api/health") in healthcheck_urls(services["grafana"])
    assert (3000, 3000) in published_ports(services["grafana"])


def test_grafana_datasource_agrees_with_clickhouse(services: dict[str, Any]) -> None:
    # Grafana expands ${VAR} in provisioning files from its own environment.
    grafana_env = env_of(services["grafana"])
    provisioned = interpolate(yaml.safe_load(DATASOURCE.read_text()), grafana_env)
    (ds,) = [d for d in provisioned["datasources"] if d["type"] == "grafana-clickhouse-datasource"]
    data, ch_env = ds["jsonData"], env_of(services["clickhouse"])
    assert data["host"] == "clickhouse" and data["host"] in services
    assert int(data["port"]) == CLICKHOUSE_HTTP_PORT and data["protocol"] == "http"
    assert data["defaultDatabase"] == ch_env["CLICKHOUSE_DB"] == env_of(services["gateway"])["CLICKHOUSE_DATABASE"]
    # Grafana reads as the read-only user the ClickHouse init script creates, never as the writer or default.
    assert data["username"] == ch_env["GRAFANA_CLICKHOUSE_USER"] == HOST_ENV["GRAFANA_CLICKHOUSE_USER"]
    assert data["username"] not in (ch_env["CLICKHOUSE_USER"], "default")
    assert ds["secureJsonData"]["password"] == ch_env["GRAFANA_CLICKHOUSE_PASSWORD"]
    assert ds["secureJsonData"]["password"] == HOST_ENV["GRAFANA_CLICKHOUSE_PASSWORD"] != ch_env["CLICKHOUSE_PASSWORD"]
    assert ds.get("uid"), "dashboards reference the datasource by a stable uid"
    assert grafana_mounts(services).get("/etc/grafana/provisioning/datasources") == "./" + str(
        DATASOURCE.parent.relative_to(ROOT)
    )


def test_grafana_dashboards_provider_points_at_the_mounted_repo_folder(services: dict[str, Any]) -> None:
    (provider,) = yaml.safe_load(DASHBOARD_PROVIDER.read_text())["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    mounts = grafana_mounts(services)
    assert path in mounts, f"{path} is not mounted into grafana: {mounts}"
    assert (ROOT / mounts[path]).is_dir()
    assert mounts.get("/etc/grafana/provisioning/dashboards") == "./" + str(DASHBOARD_PROVIDER.parent.relative_to(ROOT))


# --- the read-only ClickHouse user of Grafana -------------------------------------------------------


INITDB = "/docker-entrypoint-initdb.d"


def initdb_scripts(services: dict[str, Any]) -> list[Path]:
    """The scripts clickhouse-server's entrypoint runs on a fresh volume, from the mounted repo folder."""
    mounts = [v.split(":") for v in services["clickhouse"]["volumes"] if v.split(":")[1] == INITDB]
    assert len(mounts) == 1, f"mount a repo folder at {INITDB}"
    source = ROOT / mounts[0][0]
    assert mounts[0][0].startswith("./") and source.is_dir() and mounts[0][2:] == ["ro"]
    return sorted(p for p in source.iterdir() if not p.name.startswith("."))


def run_initdb_script(
    script: Path, env: dict[str, str], tmp_path: Path, sourced: bool = False
) -> tuple[subprocess.CompletedProcess[str], list[str], str]:
    """Run ``script`` as the entrypoint would, with a stand-in clickhouse-client that records its arguments and
    the SQL on its stdin: (process, arguments, SQL)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "clickhouse-client"
    fake.write_text(f"#!/bin/bash\nprintf '%s\\n' \"$@\" > {tmp_path}/args\ncat > {tmp_path}/sql\n")
    fake.chmod(0o755)
    for name in ("args", "sql"):
        (tmp_path / name).unlink(missing_ok=True)
    # the image's entrypoint runs with `set -eo pipefail` and sources scripts that are not executable
    command = f"set -eo pipefail; . {shlex.quote(str(script))}" if sourced else f"bash {shlex.quote(str(script))}"
    proc = subprocess.run(
        ["bash", "-c", command],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    args = (tmp_path / "args").read_text().splitlines() if (tmp_path / "args").exists() else []
    sql = (tmp_path / "sql").read_text() if (tmp_path / "sql").exists() else ""
    return proc, args, sql


def test_clickhouse_creates_the_grafana_reader_on_first_start(services: dict[str, Any]) -> None:
    (script,) = initdb_scripts(services)
    assert script.suffix == ".sh" and script.stat().st_mode & 0o111, "executable: the entrypoint runs it"
    ch_env = env_of(services["clickhouse"])
    assert ch_env["CLICKHOUSE_DEFAULT_ACCESS_MANAGEMENT"] == "1", "the writer may create users"
    assert {"GRAFANA_CLICKHOUSE_USER", "GRAFANA_CLICKHOUSE_PASSWORD"} <= set(ch_env)
    assert "fresh" in script.read_text().lower() and "fresh" in COMPOSE.read_text().lower(), "say when it runs"


@pytest.mark.parametrize("sourced", [False, True], ids=["executed", "sourced"])
def test_grafana_reader_is_read_only(
    services: dict[str, Any], settings: Settings, tmp_path: Path, sourced: bool
) -> None:
    """The init script, run with the compose environment, creates a user with readonly = 1 that may only SELECT
    on the abstream database, with the password exactly as given; its SQL parses on ClickHouse."""
    (script,) = initdb_scripts(services)
    ch_env = env_of(services["clickhouse"])
    password = "it's a \\ tricky $pw `x`"
    proc, args, sql = run_initdb_script(script, {**ch_env, "GRAFANA_CLICKHOUSE_PASSWORD": password}, tmp_path, sourced)
    assert proc.returncode == 0, proc.stderr
    user, db = ch_env["GRAFANA_CLICKHOUSE_USER"], ch_env["CLICKHOUSE_DB"]
    assert args[args.index("--host") + 1] == "127.0.0.1"  # the entrypoint's temporary server
    assert args[args.index("--user") + 1] == ch_env["CLICKHOUSE_USER"]
    assert args[args.index("--password") + 1] == ch_env["CLICKHOUSE_PASSWORD"]
    assert password not in " ".join(args), "the reader's password goes on stdin, not the command line"
    statements = [" ".join(s.split()) for s in sql.split(";") if s.strip()]
    profile, create, grant = statements
    assert re.match(r"CREATE SETTINGS PROFILE OR REPLACE (\w+) SETTINGS readonly = 1,", profile)
    assert re.search(r"max_execution_time = \d+ MIN \d+ MAX \d+ CHANGEABLE_IN_READONLY$", profile)
    profile_name = profile.split()[5]
    assert create.startswith(f"CREATE USER OR REPLACE {user} IDENTIFIED WITH sha256_password BY '")
    assert create.endswith(f"' DEFAULT DATABASE {db} SETTINGS PROFILE {profile_name}")
    assert grant == f"GRANT SELECT ON {db}.* TO {user}"
    c = ch_client(settings, database=None)
    try:
        for statement in statements:
            c.query(f"EXPLAIN AST {statement}")  # raises on a syntax error
        literal = create[create.index(" BY ") + 4 : create.index(" DEFAULT DATABASE")]
        assert c.query(f"SELECT {literal}").result_rows == [(password,)], "the password survives quoting"
    finally:
        c.close()


@pytest.mark.parametrize("name", ["abstream", "default", "grafana-reader", "1reader", "a b", "x;DROP"])
def test_grafana_reader_needs_a_user_of_its_own(services: dict[str, Any], tmp_path: Path, name: str) -> None:
    (script,) = initdb_scripts(services)
    env = {**env_of(services["clickhouse"]), "GRAFANA_CLICKHOUSE_USER": name}
    for sourced in (False, True):
        proc, args, _ = run_initdb_script(script, env, tmp_path, sourced)
        assert proc.returncode != 0 and not args, (name, sourced, proc.stdout)
        assert "GRAFANA_CLICKHOUSE_USER" in proc.stderr


# --- Dockerfile -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    out = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def image_env() -> dict[str, str]:
    env = {}
    for keyword, args in final_stage():
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def image_copies() -> dict[str, str]:
    """Source -> destination of the final stage's COPY from the build context."""
    copies = {}
    for keyword, args in final_stage():
        if keyword != "COPY":
            continue
        words = shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue
        *sources, dest = [w for w in words if not w.startswith("--")]
        for source in sources:
            name = source.rstrip("/")
            # A directory's contents land in dest; a file lands in dest, or inside it if dest ends in /.
            is_dir = source.endswith("/") or (ROOT / name).is_dir()
            copies[name] = dest.rstrip("/") if is_dir or not dest.endswith("/") else dest + Path(name).name
    return copies


def test_dockerfile_points_config_at_the_copied_manifest_and_migrations() -> None:
    env, copies = image_env(), image_copies()
    # The same files the embedded stack uses: config's defaults (relative to the working directory, the repo's root).
    manifest, migrations = DEFAULTS["manifest_path"], DEFAULTS["migrations_dir"]
    assert manifest in copies, f"Dockerfile does not COPY {manifest}"
    assert migrations in copies, f"Dockerfile does not COPY {migrations}/"
    assert env["ABSTREAM_MANIFEST"] == copies[manifest]
    assert env["ABSTREAM_MIGRATIONS_DIR"] == copies[migrations]
    assert env.get("ABSTREAM_DATA_DIR"), "a fixed, writable data directory, not the working directory's"
    app_env = {k for k in env if k.startswith(("ABSTREAM_", "KAFKA_", "CLICKHOUSE_"))}
    assert app_env <= SETTING_ENV_NAMES, app_env - SETTING_ENV_NAMES


def test_dockerfile_runtime_image() -> None:
    stage = final_stage()
    keywords = [k for k, _ in stage]
    assert stage[0][1].split()[0] == "python:3.11-slim"
    users = [args for k, args in stage if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "run as a non-root user"
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    exposed = {p for k, args in stage if k == "EXPOSE" for p in args.split()}
    assert str(DEFAULTS["gateway_port"]) in exposed
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (entrypoint,) = [args for k, args in stage if k == "ENTRYPOINT"]
    assert entrypoint == '["abstream"]' and "abstream" in scripts
    installs = [args for k, args in dockerfile_instructions() if k == "RUN" and "pip install" in args]
    assert any(re.search(r"pip install \.(\s|$)", args) for args in installs), installs
    assert not any("[embedded]" in args or "[dev]" in args for args in installs), "runtime deps only"


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".abstream-data", ".git", ".env"} <= patterns
    # Excluding these would break the build: they are what the image is made of.
    assert not patterns & {"tests.json", "clickhouse", "abstream", "pyproject.toml"}
