"""The CLI's shared parts: the typer app, the consoles (stderr for messages, stdout for tables), progress bars."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import typer
from rich.console import Console
from rich.markup import escape

from edgekd import __version__


def _plain_help_types() -> None:
    """typer 0.29's help shows Python types: a flag's `<bool>` (`--tta <bool>`, even `--help <bool>`) as if it took
    a value, `<list[str]>` for a repeatable option or a variadic argument, `<int range>` beside its `[x>=1]`, and
    `{checkpoint}` for a required argument in the usage line; its command list keeps a docstring's line breaks.
    Shown instead: nothing for a flag, the element type (`--set <str>`, repeatable as its help says), `<int>`,
    CHECKPOINT / [OUT] in the usage line as click writes them, and each command's summary as one paragraph. A typer
    without these hooks is left as it is."""
    import inspect
    import re

    from typer.core import TyperArgument, TyperOption

    def plain(shown):
        def display_type_rich(self, ctx):
            if getattr(self, "is_flag", False):
                return None
            label = shown(self, ctx)
            return re.sub(r"<(?:list\[(\w+)\]|(\w+) range)>", lambda m: f"<{m.group(1) or m.group(2)}>", label) \
                if label else label
        display_type_rich.plain = True
        return display_type_rich

    for cls in (TyperOption, TyperArgument):
        shown = getattr(cls, "display_type_rich", None)
        if shown is not None and not getattr(shown, "plain", False):
            cls.display_type_rich = plain(shown)

    def usage_name(self):
        name = self.display_name_raw.upper()
        return (name if self.required else f"[{name}]") + ("..." if self.nargs != 1 else "")

    if hasattr(TyperArgument, "_usage_display_name"):
        TyperArgument._usage_display_name = usage_name
    if not {"--help", "-h"} & set(sys.argv[1:]) and len(sys.argv) > 2:  # (-h had kept the docstring's breaks)
        return  # the command list is help only: rich's markdown stays unimported on a prediction's start
    from typer import rich_utils

    command_help = getattr(rich_utils, "_make_command_help", None)
    if command_help is not None and not getattr(command_help, "plain", False):
        def one_paragraph(*, help_text: str, **kwargs):  # "run two / optimizer steps" at the docstring's breaks
            return command_help(help_text=re.sub(r"(?<!\n)\n(?!\n)", " ", inspect.cleandoc(help_text)), **kwargs)

        one_paragraph.plain = True
        rich_utils._make_command_help = one_paragraph
    if hasattr(rich_utils, "_fix_linebreaks") and not getattr(rich_utils._fix_linebreaks, "plain", False):
        def joined(paragraphs, *args, **kwargs):  # a command's later paragraphs, reflowed to the terminal too
            return "\n\n".join(p if p.startswith("\b") else re.sub(r"\n", " ", p) for p in paragraphs)

        joined.plain = True
        rich_utils._fix_linebreaks = joined


_plain_help_types()
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Distill medical-imaging classifiers into small, verified models for CPU edge devices.")
console = Console(stderr=True, highlight=False, soft_wrap=True)
class OutputConsole(Console):
    """stdout's console. A reader gone (`edgekd eval ... | head -1`) leaves the command to finish its files, the
    rest of stdout discarded: rich's default ended it with exit 1 mid-way, without a word (eval's staged results
    removed, its --corruptions never run)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


PIPED_WIDTH = 4096
"""stdout's width when it is no terminal (a file, a pipe, a CI log): tables take their natural width, every cell
whole. At 160 columns rich had cut cells to "…" (a bench's img/s, a path, onnx/int8 vs onnx/fp32 rows alike)."""
out_console = OutputConsole(highlight=False, width=None if sys.stdout.isatty() else PIPED_WIDTH)
STATE: dict = {"debug": False, "on_interrupt": None}
"""on_interrupt: a command's hint for an interrupted run (a callable returning a line, or None)."""


def torchrun_worker() -> tuple[int, int]:
    """(rank, world size) from the environment torchrun gives its workers; (0, 1) outside torchrun. Read here, not
    through torch.distributed: the CLI's messages must not import torch."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    return int(rank) if rank.isdigit() else 0, int(world) if world.isdigit() else 1


def say_interrupted() -> None:
    if torchrun_worker()[0] != 0:  # under torchrun rank 0 says it, once
        return
    hint = STATE["on_interrupt"]() if STATE["on_interrupt"] else None
    console.print("interrupted" + (f" ({hint})" if hint else ""))


BUNDLE_PRECISION_HELP = "fp32, fp16 or int8 (default: the most precise model in the bundle, fp32 first)."


def _version(value: bool) -> None:
    if value:
        print(f"edgekd {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    STATE["debug"] = debug


def progress_bar():
    """A rich progress bar on stderr; silent when stderr is not a terminal (CI logs stay readable)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def plain_log(printer) -> Callable[[str], None]:
    """A library's log line printed as it is: its model names and paths may hold [brackets], which rich would read as
    markup (a `--compare` of two runs of one model, labelled `name [path]`, had failed with a MarkupError)."""
    return lambda line: printer(escape(str(line)))


def checkpoint_argument(path: Path) -> Path:
    """A CHECKPOINT argument (export, eval, explain): a training run's folder stands for its best.pt (a continual
    run's: model.pt), as `report` and `bench` take it; a bundle, or any other path, as given."""
    from edgekd.runtime import is_bundle

    if path.is_dir() and not is_bundle(path):
        for name in ("best.pt", "model.pt"):
            if (path / name).is_file():
                return path / name
    return path


def with_progress(run):
    """`run(log, progress)` under the progress bar; `log` prints above the bar on a terminal."""
    with progress_bar() as progress:
        return run(plain_log(progress.console.print if progress.console.is_terminal else console.print), progress)


def _quiet(*_args, **_kwargs) -> None:
    """The log of ranks other than 0."""
