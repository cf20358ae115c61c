"""Running the `mpboot` CLI in-process, and its error contract: an exit code, exactly one
line on stderr, never a traceback (docs: README "Exit status"). Shared by the CLI tests."""

from __future__ import annotations

import traceback

from click.testing import CliRunner, Result

from mpboot.cli import cli


def run(*args: object, env: dict[str, str | None] | None = None) -> Result:
    """Invoke the CLI in-process; stdout and stderr are captured separately (click 8.2+)."""
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, prog_name="mpboot")


def describe(result: Result) -> str:
    exc = result.exception
    where = ""
    if exc is not None and not isinstance(exc, SystemExit) and result.exc_info is not None:
        where = "".join(traceback.format_exception(*result.exc_info))
    return f"exit {result.exit_code}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}\n{where}"


def assert_ok(result: Result) -> Result:
    assert result.exit_code == 0, describe(result)
    assert result.exception is None, describe(result)
    return result


def assert_error(result: Result, exit_code: int, *fragments: str, prefix: str = "mpboot: error:") -> str:
    """The error contract: the exit code, exactly one non-empty line on stderr (containing
    `fragments`), and no traceback, neither printed nor escaped from the command."""
    assert isinstance(result.exception, (SystemExit, type(None))), (
        f"uncaught {type(result.exception).__name__} (a user would see a traceback)\n{describe(result)}"
    )
    assert result.exit_code == exit_code, describe(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), describe(result)
    assert "Traceback" not in result.stdout + result.stderr
    line = lines[0]
    assert line.startswith(prefix), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line
