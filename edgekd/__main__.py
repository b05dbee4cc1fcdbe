"""`python -m edgekd ...` (also what `torchrun -m edgekd train ...` runs)."""

from edgekd.cli import run

run()
