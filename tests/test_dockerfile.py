"""The Dockerfile builds what pyproject.toml packages, and the image can be probed and reached.

No container engine runs here (``docker info`` fails), so the image is checked as text: every
COPY source exists and survives .dockerignore (a renamed package broke the build once), the
packages pyproject.toml installs are all copied, the ports are exposed, the HEALTHCHECK's
Python actually probes a running API.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import shlex
import subprocess
import tomllib
from pathlib import Path

from tests.support.bridge import running_bridge

REPO = Path(__file__).resolve().parents[1]


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        lines.append((word.upper(), rest.strip()))
    return lines


def _sources(arguments: str) -> list[str]:
    words = [w for w in shlex.split(arguments) if not w.startswith("--")]
    return words[:-1]


def _ignored(path: str) -> bool:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = Path(path).parts
    # A pattern excludes the path itself or any directory above it.
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
        for pattern in patterns
        for prefix in prefixes
    )


def test_every_copy_source_exists_and_is_not_ignored() -> None:
    copies = [args for word, args in _instructions() if word == "COPY"]
    assert copies
    for arguments in copies:
        for source in _sources(arguments):
            assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
            assert not _ignored(source), f"COPY {source}: excluded by .dockerignore"


def test_the_packages_pyproject_installs_are_all_copied() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = {
        pattern.rstrip("*")
        for pattern in config["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {
        source for word, args in _instructions() if word == "COPY" for source in _sources(args)
    }
    assert wanted <= copied, f"packages not copied into the image: {sorted(wanted - copied)}"
    # The readme pyproject names must be there too, or `pip install .` fails.
    assert config["project"]["readme"] in {
        name for word, args in _instructions() if word == "COPY" for name in _sources(args)
    }


def test_ports_are_exposed_and_the_default_command_listens_beyond_loopback() -> None:
    instructions = _instructions()
    exposed = {port for word, args in instructions if word == "EXPOSE" for port in args.split()}
    assert exposed == {"5683/udp", "5684/udp", "8080", "1883"}
    (cmd,) = [json.loads(args) for word, args in instructions if word == "CMD"]
    assert cmd[0] == "up"
    for flag in ("--api-host", "--mqtt-host"):
        assert cmd[cmd.index(flag) + 1] == "0.0.0.0"
    assert cmd[cmd.index("--demo-ip") + 1] == "gateway"


def _healthcheck_python() -> str:
    (line,) = [args for word, args in _instructions() if word == "HEALTHCHECK"]
    exec_form = json.loads(line[line.index("CMD") + 3 :])
    assert exec_form[:2] == ["python3", "-c"], "the slim image has python, not curl"
    code: str = exec_form[2]
    ast.parse(code)
    return code


async def test_the_healthcheck_passes_against_a_running_api(tmp_path: Path) -> None:
    code = _healthcheck_python()
    async with running_bridge(tmp_path) as bridge:
        port = bridge.api_url.rsplit(":", 1)[1]
        ok = subprocess.run(
            ["python3", "-c", code], env={"COAP_BRIDGE_API_PORT": port}, capture_output=True,
            text=True, timeout=10, check=False,
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
    # The same probe once nothing listens there fails, as Docker must see it.
    down = subprocess.run(
        ["python3", "-c", code], env={"COAP_BRIDGE_API_PORT": port}, capture_output=True,
        text=True, timeout=10, check=False,
    )  # fmt: skip
    assert down.returncode != 0
    assert "Connection refused" in down.stderr


def test_make_run_installs_no_dev_tools() -> None:
    # -n: print the recipes without running them; -B: as if nothing were installed yet.
    run = subprocess.run(
        ["make", "-n", "-B", "run"], cwd=REPO, capture_output=True, text=True, check=True
    )
    installs = [line for line in run.stdout.splitlines() if "pip install" in line]
    assert any(line.rstrip().endswith("-e .") for line in installs), run.stdout
    assert not any("[dev]" in line for line in installs), run.stdout
    test = subprocess.run(
        ["make", "-n", "-B", "pytest"], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert "'.[dev]'" in test.stdout
