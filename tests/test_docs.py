"""README's Commands section kept true to the CLI (sqlite-utils' test_docs.py
idea): every command is listed, every option of `render` and `cache warm` is in
the options table, and every option README names exists. (That every command
has help text listing its options: test_cli.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from emailpers.cli import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else None]


COMMANDS_SECTION = section("Commands")
# The command block: one line per command, `emailpers NAME [ARGS]   what it does`.
COMMAND_LINES = [line for line in COMMANDS_SECTION.splitlines() if line.startswith("emailpers ")]
# The option table of render and cache warm: its first column, `--name VALUE`.
TABLE_OPTIONS = [
    match.group(0)
    for row in COMMANDS_SECTION.splitlines()
    if row.startswith("| `--")
    for match in [OPTION.search(row.split("|")[1])]
    if match
]


def leaf_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> dict[str, click.Command]:
    found: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found |= leaf_commands(command, (*prefix, name))
        else:
            found[" ".join((*prefix, name))] = command
    return found


COMMANDS = leaf_commands(cli)


def long_names(command: click.Command) -> set[str]:
    return {name for param in command.params for name in param.opts + param.secondary_opts if name.startswith("--")}


def documented_command(line: str) -> str:
    """The command a block line documents: the longest command name it starts with."""
    words = line.split()[1:]
    names = [name for name in COMMANDS if words[: len(name.split())] == name.split()]
    assert names, f"README lists a command the CLI does not have: {line!r}"
    return max(names, key=len)


def test_the_readme_parts_this_test_reads_are_there() -> None:
    assert len(COMMAND_LINES) >= 5
    assert len(TABLE_OPTIONS) >= 10


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_is_in_the_readme_command_block(name: str) -> None:
    assert name in {documented_command(line) for line in COMMAND_LINES}, f"`emailpers {name}` missing from README"


@pytest.mark.parametrize("line", COMMAND_LINES)
def test_every_option_in_the_command_block_exists(line: str) -> None:
    name = documented_command(line)
    for option in OPTION.findall(line):
        assert option in long_names(COMMANDS[name]), f"README: `emailpers {name}` has no {option}"


@pytest.mark.parametrize("name", ["render", "cache warm"])
def test_every_option_of_the_fetching_commands_is_in_the_readme_table(name: str) -> None:
    for param in COMMANDS[name].params:
        names = {n for n in param.opts + param.secondary_opts if n.startswith("--")}
        if names:  # arguments have none
            assert names & set(TABLE_OPTIONS), f"README's option table lacks {sorted(names)} of `{name}`"


@pytest.mark.parametrize("option", TABLE_OPTIONS)
def test_every_option_in_the_readme_table_exists(option: str) -> None:
    assert option in long_names(COMMANDS["render"]) | long_names(COMMANDS["cache warm"]), option

