"""`python -m edgekd.cli`, as `python -m edgekd`."""

from edgekd.cli import run

run()
