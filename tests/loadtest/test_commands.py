"""`python -m loadtest COMMAND`: every harness tool is a subcommand, and there is no other entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.__main__ import COMMANDS, main

LOADTEST = Path(__file__).resolve().parents[2] / "loadtest"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_tool_has_a_subcommand_and_options(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m loadtest {command}")


def test_the_command_list_names_every_tool(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert [command for command in COMMANDS if f"\n    {command}" not in listing] == []
    with pytest.raises(SystemExit) as exited:
        main(["no-such-tool"])
    assert exited.value.code == 2


def test_no_module_is_a_script_of_its_own() -> None:
    scripts = [
        path.name
        for path in LOADTEST.glob("*.py")
        if path.name != "__main__.py" and '__name__ == "__main__"' in path.read_text()
    ]
    assert scripts == []
