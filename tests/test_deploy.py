"""Container deployment, checked without Docker: docker-compose.yml, Dockerfile and .dockerignore
say what deploy/README.md and the setup guide say (ports, variables, services, health checks)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from inventiv.config import API_BASE_PORT, ORCHESTRATOR_BASE_PORT

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, Any] = COMPOSE["services"]
README = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
DOCKERFILE = (ROOT / "Dockerfile").read_text(encoding="utf-8")
VARIABLE = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::-([^}]*))?\}")
PORT_MAPPING = re.compile(
    r"^127\.0\.0\.1:\$\{(?P<var>[A-Z_]+_HOST_PORT):-(?P<default>\d+)\}:(?P<container>\d+)$"
)


def table(markdown: str, header_start: str) -> list[list[str]]:
    """Rows of the markdown table whose header line starts with `header_start`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    return rows


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_services_are_postgres_orchestrator_api() -> None:
    assert set(SERVICES) == {"postgres", "orchestrator", "api"}
    assert SERVICES["postgres"]["image"] == "postgres:15"
    assert SERVICES["orchestrator"]["command"][:3] == ["inventiv", "serve", "orchestrator"]
    assert SERVICES["api"]["command"][:3] == ["inventiv", "serve", "api"]


def test_api_port_is_the_guides_option_b_on_loopback() -> None:
    assert SERVICES["api"]["ports"] == ["127.0.0.1:${API_HOST_PORT:-8003}:8003"]
    assert option(SERVICES["api"]["command"], "--port") == str(API_BASE_PORT)


def test_every_published_port_is_loopback_and_offsettable() -> None:
    """PORT_OFFSET reaches a published port only through its *_HOST_PORT variable."""
    seen = {}
    for name, service in SERVICES.items():
        for mapping in service.get("ports", []):
            match = PORT_MAPPING.match(mapping)
            assert match, f"{name}: {mapping!r} must be 127.0.0.1:${{X_HOST_PORT:-n}}:n"
            assert match["default"] == match["container"]
            seen[match["var"]] = int(match["default"])
            if name != "postgres":
                assert option(service["command"], "--port") == match["container"]
    assert seen == {
        "API_HOST_PORT": API_BASE_PORT,
        "ORCHESTRATOR_HOST_PORT": ORCHESTRATOR_BASE_PORT,
        "POSTGRES_HOST_PORT": 5432,
    }


def test_inventiv_services_use_postgres_and_fixed_inner_ports() -> None:
    for name in ("orchestrator", "api"):
        env = SERVICES[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql+asyncpg://inventiv:")
        assert env["DATABASE_URL"].endswith("@postgres:5432/inventiv")
        assert env["PORT_OFFSET"] == "0"
        assert env["API_HOST_PORT"] == "8003"
        assert env["INVENTIV_ORCHESTRATOR_HOST"] == "orchestrator"
        assert env["INVENTIV_DATA_DIR"] == "/data"
        assert SERVICES[name]["env_file"] == [{"path": "env/dev.env", "required": False}]
    assert option(SERVICES["orchestrator"]["command"], "--host") == "0.0.0.0"
    assert option(SERVICES["api"]["command"], "--host") == "0.0.0.0"


def test_health_checks_and_start_order() -> None:
    for name, service in SERVICES.items():
        assert service["healthcheck"]["test"], f"{name} has no health check"
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])
    orchestrator_check = " ".join(SERVICES["orchestrator"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8001/healthz" in orchestrator_check
    api_check = " ".join(SERVICES["api"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8003/" in api_check and "'orchestrator'] == 'ok'" in api_check
    assert SERVICES["orchestrator"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert SERVICES["api"]["depends_on"] == {"orchestrator": {"condition": "service_healthy"}}


@pytest.mark.parametrize("service", ["orchestrator", "api"])
def test_health_check_commands_are_valid_python(service: str) -> None:
    test = SERVICES[service]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    compile(test[3], f"{service}-healthcheck", "exec")


def test_readme_variables_table_matches_compose() -> None:
    in_compose = {m[1]: m[2] for m in VARIABLE.finditer(COMPOSE_TEXT)}
    documented = {row[0]: row[1] for row in table(README, "| variable |")}
    assert documented == in_compose


def test_readme_services_table_matches_compose() -> None:
    rows = {row[0]: row for row in table(README, "| service |")}
    assert set(rows) == set(SERVICES)
    for name in ("orchestrator", "api"):
        assert rows[name][2] == " ".join(SERVICES[name]["command"])
    for name, service in SERVICES.items():
        match = PORT_MAPPING.match(service["ports"][0])
        assert match is not None
        assert rows[name][3] == match["container"]
        assert rows[name][4] == f"${{{match['var']}:-{match['default']}}}"


def test_dockerfile_is_slim_non_root_and_runs_the_cli() -> None:
    assert re.search(r"^FROM python:3\.11-slim\b", DOCKERFILE, re.M)
    assert re.search(r"^RUN pip install \.$", DOCKERFILE, re.M)
    user = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r'^CMD \["inventiv", "serve", "api"', DOCKERFILE, re.M)
    assert SERVICES["api"]["build"] == "." and SERVICES["orchestrator"]["build"] == "."


def test_dockerignore_keeps_secrets_and_venv_out_of_the_image() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"env", ".venv", ".git", ".inventiv"} <= ignored
    # but what the Dockerfile copies is there
    for copied in ("pyproject.toml", "README.md", "src"):
        assert copied not in ignored


def test_serve_takes_host_and_port() -> None:
    """The compose commands rely on `inventiv serve api|orchestrator --host H --port P`."""
    result = subprocess.run(
        [sys.executable, "-m", "inventiv.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": ""},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--host" in result.stdout and "--port" in result.stdout
