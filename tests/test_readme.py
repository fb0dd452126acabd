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


def code_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, content)`` of every fenced block, in order."""
    blocks, language, lines = [], "", None
    for line in text.splitlines():
        if line.startswith("```"):
            if lines is None:
                language, lines = line[3:].strip(), []
            else:
                blocks.append((language, "\n".join(lines)))
                lines = None
        elif lines is not None:
            lines.append(line)
    return blocks


def synopsis_lines() -> list[str]:
    """The command synopses of the README (code blocks without a language, inline `mednext ...`)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = [
        line.split("#")[0].strip()
        for language, block in code_blocks(readme)
        if not language
        for line in block.splitlines()
        if line.strip().startswith(("mednext ", "torchrun "))
    ]
    lines += re.findall(r"`(mednext (?:summary|benchmark|upkern|export)[^`]*)`", readme.replace("\n", " "))
    return lines


def concrete(line: str) -> list[str]:
    """A synopsis as arguments: optional groups kept, the first of `a|b` alternatives, no `...`."""
    line = line.split(" -m ", 1)[1] if line.startswith("torchrun ") else line
    words = re.sub(r"[\[\]]", " ", line).replace("...", " ").split()[1:]
    return [w if w.startswith("-") else w.split("|")[0] for w in words]


def test_the_readme_synopses_use_flags_and_values_the_command_accepts():
    from mednext.cli import build_parser

    parser = build_parser()
    lines = synopsis_lines()
    assert len(lines) >= 8
    for line in lines:
        args = concrete(line)
        try:
            parsed = parser.parse_args(args)
        except SystemExit:
            raise AssertionError(f"README: `{line}` is not accepted by the command line") from None
        assert parsed.command == args[0]
