"""The project's exception type: a one-line message naming the file, key or value at fault."""


class EdgeKDError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits non-zero."""

