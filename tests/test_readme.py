"""The README's commands are what CI runs, and they install the pinned versions."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return [c.strip() for c in re.findall(r"```bash\n(.+?)\n```", readme, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) >= 2
    test_command = commands[1]
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_two_commands_install_the_constrained_versions():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    assert pins.get("torch") and pins.get("nnunetv2"), "constraints.txt must pin torch and nnunetv2"
    for command in readme_commands()[:2]:
        assert "pip install -c constraints.txt -e " in command, command
