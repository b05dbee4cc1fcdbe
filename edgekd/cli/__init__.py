"""The `edgekd` command line (typer + rich): a thin layer over the pipeline stages.

Commands are registered here in pipeline order (that is the order of `edgekd --help`). Stage modules are imported
inside each command so `edgekd predict` runs on a box without PyTorch.
"""

from __future__ import annotations

from edgekd.cli.console import app
from edgekd.cli.deployment import bench, export, predict, repository, serve, update
from edgekd.cli.process import run, stopped
from edgekd.cli.training import check, eval_, explain, report, train

COMMANDS = {"train": train, "check": check, "eval": eval_, "export": export, "update": update, "predict": predict,
            "repository": repository, "serve": serve, "bench": bench, "report": report, "explain": explain}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)

__all__ = ["COMMANDS", "app", "run", "stopped"]
