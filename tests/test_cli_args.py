"""Bad arguments and configuration: exit status 2 with a message saying what is wrong,
before anything is connected to; an unreachable database at start: exit status 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from depeche_rs.__main__ import main

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/depeche"


def _project(*extra: str) -> list[str]:
    return ["project", "--dsn", UNREACHABLE, "--store", "s", "--stream", "a", *extra]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (_project("--partitioner", "stream-hash"), "arguments: missing wildcards"),
        (_project("--wildcard", "acc-%"), "arguments: missing partitioner"),
        (_project("--wildcard", "acc-%", "--partitioner", "hash-mod:0"), "modulus must be"),
        (_project("--wildcard", "acc-%", "--partitioner", "hash-mod:x"), "modulus must be"),
        (_project("--wildcard", "acc-%", "--partitioner", "random"), "unknown partitioner"),
        (
            _project("--wildcard", "acc-%", "--partitioner", "no_such_module_x1:P"),
            "cannot import module 'no_such_module_x1'",
        ),
        (
            _project("--wildcard", "acc-%", "--partitioner", "tests.test_cli_app:Nope"),
            "has no attribute 'Nope'",
        ),
        (
            _project("--wildcard", "acc-%", "--partitioner", "tests.test_cli_app:serializer"),
            "has no get_partition(message) method",
        ),
        (
            _project("--wildcard", "a", "--partitioner", "stream-hash", "--serializer", "json:x"),
            "'json' has no attribute 'x'",
        ),
        (
            _project("--wildcard", "", "--partitioner", "stream-hash"),
            "a stream wildcard must not be the empty string",
        ),
        (
            _project("--wildcard", "acc-\\", "--partitioner", "stream-hash"),
            "ends with an escape character",
        ),
        (
            _project("--wildcard", "acc-%", "--partitioner", "stream-hash", "--batch-size", "0"),
            "batch_size must be at least 1",
        ),
        (
            _project("--wildcard", "a", "--partitioner", "stream-hash", "--poll-interval", "0"),
            "poll interval must be a positive number",
        ),
        (
            [*_project()[:6], "bad-name", "--wildcard", "a", "--partitioner", "stream-hash"],
            "'bad-name' is not a valid identifier",
        ),
        (["project", "--store", "s"], "nothing to project"),
        (
            [
                "project",
                "--store",
                "s",
                "--stream",
                "a",
                "--wildcard",
                "a",
                "--partitioner",
                "stream-hash",
            ],
            "no database: pass --dsn",
        ),
        (["project", "--config", "/nonexistent/x.toml"], "cannot read config file"),
        (["status", "--dsn", "mysql://u@h/db"], "unsupported DSN"),
        (["status", "--dsn", UNREACHABLE, "--top", "-1"], "--top must be 0"),
        (["status", "--dsn", UNREACHABLE, "--subscription", "x"], "takes NAME=STREAM"),
        (["migrate", "--store", "x;drop"], "'x;drop' is not a valid identifier"),
        (["migrate", "--store", "s", "--apply"], "no database"),
    ],
)
def test_bad_arguments_exit_2_before_connecting(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DEPECHE_RS_DSN", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith(f"depeche-rs {argv[0]}: error: ")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("streams = [", "is not valid TOML"),
        ("colour = 'blue'\n", "config: unknown key(s) colour"),
        ("poll_interval = 'fast'\n[[streams]]\n", "poll_interval must be a float"),
        ("streams = 3\n", "streams must be an array of tables"),
        (
            "[[streams]]\nstore = 's'\nstream = 'a'\nwildcards = 'acc-%'\npartitioner = 'x'\n",
            "wildcards must be a list of strings",
        ),
        (
            "[[streams]]\nstore = 's'\nstream = 'a'\nwildcards = ['a']\npartitioner = "
            "'stream-hash'\nbatch = 3\n",
            "config [[streams]] #1: unknown key(s) batch",
        ),
        (
            "[[streams]]\nstore = 's'\nstream = 'a'\nwildcards = ['a']\npartitioner = "
            "'stream-hash'\n[[streams]]\nstore = 't'\nstream = 'a'\nwildcards = ['b']\n"
            "partitioner = 'stream-hash'\n",
            "aggregated stream(s) listed twice: a",
        ),
    ],
)
def test_bad_config_files_exit_2(
    content: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(content)
    assert main(["project", "--dsn", UNREACHABLE, "--config", str(config)]) == 2
    assert message in capsys.readouterr().err


def test_config_and_stream_arguments_together_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[[streams]]\nstore = 's'\nstream = 'a'\nwildcards = ['a']\n")
    argv = ["project", "--dsn", UNREACHABLE, "--config", str(config), "--stream", "b"]
    assert main(argv) == 2
    assert "either in the config file" in capsys.readouterr().err


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["project", "--log-format", "xml"])
    assert info.value.code == 2
    assert "invalid choice: 'xml'" in capsys.readouterr().err


def test_an_unreachable_database_at_start_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    argv = _project("--wildcard", "acc-%", "--partitioner", "stream-hash")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "ERROR cannot start: could not connect to PostgreSQL at" in err
    assert main(["status", "--dsn", UNREACHABLE]) == 1
    assert "depeche-rs status: cannot connect to " + UNREACHABLE in capsys.readouterr().err


def test_the_console_script_lists_the_commands() -> None:
    script = Path(sys.executable).with_name("depeche-rs")
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0
    assert "{demo,project,status,migrate,generate-migration-script}" in result.stdout
