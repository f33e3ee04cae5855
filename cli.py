"""The command-line contract of train.py and evaluate.py: one line and an exit code, and safe output.

Plumbing. What both command lines promise: bad input (`USER_ERRORS`) is one line `error: ...` on
stderr and exit code 2, never a traceback (`fail`, `OneLineCommand` for click's own usage errors);
Ctrl-C is one line and exit code 130 (`Interrupted`); a closed or full stdout never costs finished
work and a character the terminal cannot encode is written in ASCII (`OutputStream`, `run_cli`); off
a terminal (a file, a pipe) no table, path or --help line is squeezed, cut or broken (`console`,
`OneLineCommand.format_help`). docs/reliability.md lists the cases and their tests.
"""

import codecs
import io
import os
import sys
import unicodedata

import typer
import typer.core
import typer.rich_utils
from rich.console import Console

import backbone as backbones
import data
import smat

class RunError(ValueError):
    """A run directory, checkpoint or flag that cannot be used; the message is one line."""


def reason(error: BaseException) -> str:
    """The short reason of an error, for a one-line message: "No space left on device"."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip()
    return text.splitlines()[0][:160] if text else type(error).__name__


def one_line(message: str) -> str:
    """Whitespace (newlines in a path, say) collapsed into single spaces."""
    return " ".join(str(message).split())


# The exceptions that mean "bad input" (a flag, a file, a folder): one line and exit code 2.
USER_ERRORS: tuple[type[Exception], ...] = (smat.ConfigError, data.DataError, backbones.BackboneError, RunError)


class Interrupted(Exception):
    """Ctrl-C during a run; the message says what was kept and how to go on (exit code 130)."""


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and an exit code: the contract for bad input (no traceback)."""
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code)


def os_error_line(error: OSError) -> str:
    """An operating-system error no check foresaw, as one line naming the path and the reason."""
    return f"cannot use {error.filename} ({reason(error)})" if error.filename else reason(error)


# click's UsageError (a missing or malformed value), whether typer vendors click or uses it: the base
# class of typer.BadParameter in both cases.
USAGE_ERROR = typer.BadParameter.__bases__[0]


# Off a terminal (a log file, a pipe, nohup, SLURM) rich lays everything out in 80 columns: a table's
# cells split over two lines, headers cut, a path broken mid-name. This width is beyond any table or
# line the commands print, so each keeps its natural width.
UNLIMITED_WIDTH = 10_000
# --help off a terminal: typer draws its option panels as wide as the console, so it needs a finite
# width, one at which no option row of train.py or evaluate.py wraps (their widest is 229 columns).
HELP_WIDTH = 240


def console(stderr: bool = False) -> Console:
    """The rich Console of a command line's stdout (or stderr), the one place that decides its width:
    on a terminal, the terminal's (rich's own choice); off one, unlimited and never wrapping, so a
    table takes its natural width and a line is written as it was printed."""
    out = Console(stderr=stderr)
    if not out.is_terminal:
        out.width, out.soft_wrap = UNLIMITED_WIDTH, True
    return out


class OneLineCommand(typer.core.TyperCommand):
    """A Typer command whose usage errors (an unknown flag, a missing value, `--experts two`, a value
    outside a flag's choices) are one line and exit code 2, like every other bad input, instead of
    click's multi-line usage box, and whose --help is whole in a pipe or a file:
    `@app.command(cls=OneLineCommand)`."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except USAGE_ERROR as error:
            fail(error.format_message())

    def format_help(self, ctx, formatter):
        """Off a terminal (`--help | less`, a file) typer would lay the help out in 80 columns and cut
        flag names (`--checkpoint-eve…`): there it gets HELP_WIDTH. A terminal keeps its own width, and
        TERMINAL_WIDTH, typer's own setting, wins where it is set."""
        if typer.rich_utils.MAX_WIDTH is not None or Console().is_terminal:
            return super().format_help(ctx, formatter)
        typer.rich_utils.MAX_WIDTH = HELP_WIDTH
        try:
            return super().format_help(ctx, formatter)
        finally:
            typer.rich_utils.MAX_WIDTH = None


# Characters the tables and the progress line use, for a stream that cannot encode them.
ASCII = {"±": "+/-", "−": "-", "≥": ">=", "≤": "<=", "…": "...", "×": "x", "→": "->", "‖": "||", "∧": "&", "∨": "|"}


def _ascii_char(char: str) -> str:
    """± as +/-, é as e, a letter by its name (tau), a box line as - or |, else '?'."""
    if char.isascii():
        return char
    name = unicodedata.name(char, "")
    plain = unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode()
    return ASCII.get(char) or plain or ("-" if "HORIZONTAL" in name else "|" if "VERTICAL" in name else
                                        name.split()[-1].lower() if " LETTER " in name else "?")


def print_line(console, line: str) -> None:
    """One whole line on a rich Console, never wrapped or styled (a log file reads it as written);
    ASCII where the stream cannot encode more (PYTHONIOENCODING=ascii: no λ, ±)."""
    text = to_ascii if console.options.ascii_only else str
    console.print(text(line), markup=False, highlight=False, soft_wrap=True, emoji=False)


def to_ascii(text: str) -> str:
    return "".join(map(_ascii_char, text))


def _ascii_errors(error: UnicodeError):
    """The codec error handler "smat-ascii": what the stream cannot encode, in ASCII (to_ascii)."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    return to_ascii(error.object[error.start:error.end]), error.end


codecs.register_error("smat-ascii", _ascii_errors)


class OutputStream:
    """sys.stdout and sys.stderr for the command lines (stderr carries evaluate.py's progress lines),
    wrapped so that printing never costs finished work: once the reader has gone (`| head` closed the
    pipe) or the device is full (`>/dev/full`), output is dropped (the stream now points at /dev/null,
    so the interpreter's last flush succeeds too) and the command goes on to its exit code; a
    character the stream cannot encode (PYTHONIOENCODING=ascii) is written in ASCII ("smat-ascii")."""

    def __init__(self, stream) -> None:
        self._stream, self.lost = stream, False
        try:
            stream.reconfigure(errors="smat-ascii")
        except (AttributeError, ValueError, io.UnsupportedOperation):
            pass

    def write(self, text: str) -> int:
        if not self.lost:
            try:
                self._stream.write(text)
            except OSError:
                self._lose()
        return len(text)

    def flush(self) -> None:
        if not self.lost:
            try:
                self._stream.flush()
            except OSError:
                self._lose()

    def _lose(self) -> None:
        self.lost = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def run_cli(application: typer.Typer) -> None:
    """Run a Typer app from the shell: its exit code (2 for bad input, through `fail` and
    OneLineCommand; 130 on Ctrl-C), with stdout and stderr wrapped (OutputStream) so that a closed
    pipe, a full disk or an ASCII-only terminal never turns finished work into a failure."""
    sys.stdout = OutputStream(sys.stdout if sys.stdout is not None else open(os.devnull, "w"))
    sys.stderr = OutputStream(sys.stderr if sys.stderr is not None else open(os.devnull, "w"))
    try:
        code = application(standalone_mode=False)
    except typer.Abort:  # Ctrl-C while click parses the flags
        typer.echo("error: interrupted", err=True)
        code = 130
    sys.stdout.flush()
    sys.exit(code if isinstance(code, int) else 0)
