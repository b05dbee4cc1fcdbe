"""How an `edgekd` process ends: one `error:` line and exit 2 for bad input, clean removal of half-written files
and the right exit status when a signal stops it, one-line warnings."""

from __future__ import annotations

import os
import re
import signal
import sys
import warnings

import typer
from rich.markup import escape

from edgekd.cli.console import STATE, app, console, say_interrupted, torchrun_worker
from edgekd.errors import EdgeKDError, error_line, printable


def run() -> None:
    """Entry point: EdgeKDError, and OS and resource errors that name their cause, -> one `error:` line on stderr
    and exit 2 (traceback only with --debug); anything unforeseen -> one line naming its type, exit 1."""
    install_process_guards()
    STATE["on_interrupt"] = None  # set by the command this run starts (train)
    try:
        refuse_repeated_options(sys.argv[1:])
        refuse_torchrun_but_for_train(sys.argv[1:])
        code = app(standalone_mode=False)
    except EdgeKDError as err:
        if STATE["debug"]:
            raise
        fail(error_line(str(err), err.multiline))
    except KeyboardInterrupt:
        say_interrupted()
        stopped(130)
    except SystemExit as ex:
        if RECEIVED_SIGNALS:  # raised by _exit_on_signal
            say_interrupted()
            stopped(ex.code if isinstance(ex.code, int) else 128 + RECEIVED_SIGNALS[0])
        raise
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as err:  # usage errors of typer's (vendored) click, and anything unforeseen
        if RECEIVED_SIGNALS:  # e.g. the DataLoader's RuntimeError for its workers, killed by the same signal
            say_interrupted()
            stopped(128 + RECEIVED_SIGNALS[0])
        if hasattr(err, "show") and isinstance(getattr(err, "exit_code", None), int):
            usage = usage_error_line(err)
            if usage is not None:
                fail(usage)
            err.show()  # e.g. `edgekd` alone: the help
            sys.exit(err.exit_code)
        if STATE["debug"]:
            raise
        known = peer_failure(err) or known_failure(err)
        if known is not None:
            fail(error_line(known))
        detail = f": {error_line(str(err))}" if str(err) else ""
        console.print(f"[bold red]error:[/] {escape(rank_prefix())}{type(err).__name__}{escape(detail)} (run with "
                      "--debug for the traceback)", soft_wrap=True)
        sys.exit(1)
    if RECEIVED_SIGNALS:  # a kill whose exception a finalizer swallowed: still not a success
        say_interrupted()
        stopped(128 + RECEIVED_SIGNALS[0])
    # Outside standalone mode click returns a command's `typer.Exit(code)` instead of exiting with it.
    if isinstance(code, int) and code:
        sys.exit(code)


def refuse_torchrun_but_for_train(args: list[str]) -> None:
    """Only `edgekd train` runs on several processes: any other command under torchrun ran once per process
    (`check` failed on rank 1 looking for rank 0's files; exports raced each other)."""
    command = next((a for a in args if not a.startswith("-")), None)
    if torchrun_worker()[1] > 1 and command not in (None, "train") and not {"--help", "-h"} & set(args):
        raise EdgeKDError(f"edgekd {command} runs in one process: run it without torchrun (only `edgekd train` "
                          "runs on several)")


PATH_OPTIONS = ("--out", "--data", "--run-dir", "--cache-dir", "--target", "--checkpoint", "--teacher")
"""Options whose empty value would be read as the current folder (pathlib's Path("") is ".")."""


def refuse_repeated_options(args: list[str]) -> None:
    """A value option given twice had kept its last value without a word (`-p int4 -p fp32` never checked int4;
    `-p fp32 -p int8` built int8 only), and an empty path (`--out ""`) was read as the current folder."""
    import typer.main

    name = next((a for a in args if not a.startswith("-")), None)
    command = getattr(typer.main.get_command(app), "commands", {}).get(name)
    if command is None:
        return
    rest = args[args.index(name) + 1:]
    rest = rest[:rest.index("--")] if "--" in rest else rest
    for param in command.params:
        if getattr(param, "param_type_name", "") != "option" or param.multiple or param.is_flag:
            continue
        opts = [*param.opts, *param.secondary_opts]
        hits = [i for i, a in enumerate(rest) if a in opts or any(a.startswith(o + "=") for o in opts if len(o) > 2)]
        if len(hits) > 1:
            raise EdgeKDError(f"{param.opts[0]} given {len(hits)} times: give it once (a list of values is "
                              f"comma-separated, e.g. {param.opts[0]} a,b)")
        for i in hits:
            value = rest[i].split("=", 1)[1] if "=" in rest[i] else (rest[i + 1] if i + 1 < len(rest) else None)
            if value == "" and param.opts[0] in PATH_OPTIONS:
                raise EdgeKDError(f"{param.opts[0]}: an empty path (it would be read as the current folder)")


USAGE_ERRORS = ("UsageError", "BadParameter", "MissingParameter", "NoSuchOption", "BadOptionUsage",
                "BadArgumentUsage")


def usage_error_line(err: Exception) -> str | None:
    """A command-line usage error (an unknown option, a value out of range, a missing argument) as one line naming
    where to read the usage, like every other bad input; None for anything else (e.g. the help `edgekd` alone
    shows)."""
    if type(err).__name__ not in USAGE_ERRORS or not hasattr(err, "format_message"):
        return None
    ctx = getattr(err, "ctx", None)
    where = f" (see {ctx.command_path} --help)" if getattr(ctx, "command_path", None) else ""
    return error_line(err.format_message()) + where


def stopped(code: int) -> None:
    """End a run that a signal stopped: the exit handlers (temp-dir fallbacks) run, then the process exits at once.
    Interpreter shutdown would join non-daemon threads of the dependencies, and one stopped while it held the
    import lock never finishes (seen as an export hanging after SIGINT)."""
    import atexit

    from edgekd.fileio import remove_tracked_trees

    remove_tracked_trees()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def fail(line: str) -> None:
    """Print `error: <line>` on stderr (escaped: a file name like scan[left].png is not rich markup), exit 2; under
    torchrun a rank other than 0 says which it is (every rank runs the command: a bad recipe fails on each)."""
    console.print(f"[bold red]error:[/] {escape(rank_prefix() + line)}", soft_wrap=True)
    sys.exit(2)


def rank_prefix() -> str:
    """`rank N: ` in a torchrun worker other than rank 0, else nothing."""
    rank, world = torchrun_worker()
    return f"rank {rank}: " if world > 1 and rank != 0 else ""


PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")
"""What a collective call of torch.distributed (gloo, NCCL) raises on one rank when another rank has stopped."""


def peer_failure(err: BaseException) -> str | None:
    """The one line for a torchrun worker stopped by another rank's failure (a collective's RuntimeError about its
    lost peer; the process group is closed by the time it gets here), else None: torchrun's summary had named this
    rank, with that RuntimeError, as the root cause. An OSError (a download's reset connection) or a rank's own
    error keeps its own message."""
    if "torch.distributed" not in sys.modules or torchrun_worker()[1] < 2:
        return None
    if isinstance(err, RuntimeError) and any(s in str(err) for s in PEER_FAILURE):
        # rank 0 says how to go on, as for a stop (a rank killed with SIGKILL leaves no line of its own)
        hint = STATE["on_interrupt"]() if STATE["on_interrupt"] and torchrun_worker()[0] == 0 else None
        return "stopped: another rank failed (its error says why)" + (f"; {hint}" if hint else "")
    return None


def known_failure(err: BaseException) -> str | None:
    """The one-line message of an error whose cause the user can act on (a path's permission, a full disk, a
    package the install lacks, an input nested too deeply, memory), else None."""
    if isinstance(err, OSError) and (err.filename is not None or err.strerror):
        name = err.filename
        name = os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else str(name)  # an fd is an int
        where = f"{printable(name)}: " if err.filename is not None else ""
        return f"{where}{(err.strerror or type(err).__name__).lower()}"
    if isinstance(err, ModuleNotFoundError) and err.name:  # e.g. a training-side command on the core install
        return missing_package(err.name)
    if isinstance(err, RecursionError):
        return "input nested too deeply (Python's recursion limit): a self-referencing recipe or file?"
    if isinstance(err, MemoryError):
        return "out of memory (an input too large for this machine)"
    if isinstance(err, RuntimeError) and (found := re.search(r"DataLoader worker \(pid \d+\) is killed by signal: "
                                                              r"([^.]+)", str(err))):
        return (f"a data-loading worker process (data.num_workers) was killed ({found.group(1).strip()}): out of "
                "memory, or stopped from outside; data.num_workers=0 loads in the training process")
    return None


EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "multipart": "serve", "python_multipart": "serve",
          "prometheus_client": "serve", "pydicom": "dicom", "cv2": "skin", "tensorboard": "track", "wandb": "wandb"}
"""Top-level packages of the optional extras other than `train` (pyproject.toml), by import name."""


def missing_package(module: str) -> str:
    """The line for a module that failed to import: the extra that installs its package, or, when the package is
    installed but lacks that module, a version too old (e.g. openvino.opset13 before OpenVINO 2025.0)."""
    from importlib.util import find_spec

    top = module.split(".")[0]
    try:
        installed = module != top and find_spec(top) is not None
    except (ImportError, ValueError):
        installed = False
    if installed:
        from importlib.metadata import PackageNotFoundError, packages_distributions, version

        dist = (packages_distributions().get(top) or [top])[0]  # sklearn -> scikit-learn, PIL -> pillow
        try:
            have = f" {version(dist)}"
        except PackageNotFoundError:
            have = ""
        return (f"the installed {dist}{have} has no module '{module}': too old for this edgekd, or another package "
                f"of that name (pip install -U '{dist}')")
    extra = EXTRAS.get(top, "train")
    needs = "training, export and checkpoints need" if extra == "train" else "this command needs"
    return (f"this needs the Python package '{top}', which is not installed ({needs} the {extra} extra: "
            f"pip install 'edgekd[{extra}]')")


def install_process_guards() -> None:
    """Make the process end cleanly whatever stops it: SIGTERM/SIGHUP raise SystemExit and SIGINT
    KeyboardInterrupt, so `finally` blocks and exit handlers remove temp dirs and half-written files, and every
    one is recorded so the exit status says the run was stopped; warnings of
    dependencies become one `warning:` line each (once); undecodable file names print as escapes."""
    from edgekd.fileio import STOP_SIGNALS

    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler, None):
            try:
                signal.signal(sig, _exit_on_signal)
            except ValueError:  # not the main thread (an embedding application): its signals are its own
                pass
    warnings.showwarning = _one_line_warning
    sys.unraisablehook = _stop_if_swallowed
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # not a text stream we may reconfigure
            pass


RECEIVED_SIGNALS: list[int] = []
"""Signals this process was sent: their exception can be lost (raised inside a finalizer or a `__del__`, Python
prints and drops it), so `run` exits 128 + signum even when the command ran on to its end."""


def _exit_on_signal(signum, _frame) -> None:
    from edgekd.fileio import TRACKED_TREES

    RECEIVED_SIGNALS.append(signum)
    if TRACKED_TREES:
        # An export is under way: its exception would unwind through native callbacks (torch's ONNX exporter,
        # NNCF, OpenVINO) that may crash (SIGSEGV) or abort (C++ terminate) instead, and everything it would clean
        # up is in its tracked temp dirs: remove them and end here.
        say_interrupted()
        stopped(128 + signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _stop_if_swallowed(unraisable) -> None:
    """sys.unraisablehook: a stop signal's exception raised where Python cannot propagate it (a finalizer, an import
    lock's callback) ends the run here, as `run` would have, instead of a printed traceback and a run that goes on."""
    if RECEIVED_SIGNALS and isinstance(unraisable.exc_value, (KeyboardInterrupt, SystemExit)):
        say_interrupted()
        stopped(128 + RECEIVED_SIGNALS[0])  # does not return
        return
    sys.__unraisablehook__(unraisable)


_WARNED: set[tuple[str, str]] = set()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = error_line(str(message).strip().splitlines()[0] if str(message).strip() else category.__name__)
    if (category.__name__, text) in _WARNED:
        return
    _WARNED.add((category.__name__, text))
    console.print(f"[yellow]warning:[/] {escape(text)}", soft_wrap=True)
