"""The project's exception type: a one-line message naming the file, key or value at fault, and the helpers that
keep such a line printable and short whatever it quotes (file names, recipe values, backend messages)."""

from __future__ import annotations

import re

MAX_LINE = 600
"""An error line is cut to this many characters (the middle is elided): a hostile input cannot flood stderr."""
MAX_QUOTE = 200
"""A quoted value (a recipe value, a file's content) is cut to this many characters."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class EdgeKDError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits non-zero (a subclass that sets
    `multiline` keeps its own line breaks: a summary line, then indented details)."""

    multiline = False


class MissingExtraError(EdgeKDError):
    """An optional dependency is not installed; the message names the extra (`pip install 'edgekd[dicom]'`)."""


def printable(text: str) -> str:
    """`text` safe for one terminal line: control characters (ANSI escapes, newlines) and undecodable file-name
    bytes (surrogate escapes) shown as backslash escapes."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def shorten(text: str, limit: int = MAX_QUOTE) -> str:
    """At most `limit` characters: the start and the end of a longer text, with the elided count between."""
    if len(text) <= limit:
        return text
    keep = max(limit - 20, 2)
    return f"{text[: keep // 2]}...<{len(text) - keep} chars>...{text[len(text) - keep // 2:]}"


def exception_line(err: BaseException, limit: int = MAX_QUOTE) -> str:
    """What a third-party exception says, for a one-line message: its type and its first line, shortened (a
    runtime's error can run to pages)."""
    text = str(err)
    return f"{type(err).__name__}: {shorten(text.splitlines()[0], limit) if text.strip() else '-'}"


def shown(name: object, limit: int = MAX_QUOTE) -> str:
    """A file or member name for an error message: printable and bounded, without quotes."""
    return shorten(printable(str(name)), limit)


def quote(value: object, limit: int = MAX_QUOTE) -> str:
    """repr(value) for an error message, bounded (a value's repr is built only up to a size worth showing)."""
    if isinstance(value, (dict, list, tuple, set)) and oversized(value, limit, limit):
        return f"<{type(value).__name__} of {len(value)} items>"
    return shorten(repr(value), limit)


def oversized(value: object, max_values: int, max_depth: int) -> str | None:
    """Whether a nested container holds more than `max_values` values ("values") or nests deeper than
    `max_depth` ("depth"), counted without building it out: shared and self-referencing parts (YAML aliases)
    count each time they are reached, so an alias bomb or an alias to itself is caught early. None if neither."""
    count, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > max_values:
            return "values"
        if depth > max_depth:
            return "depth"
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, (list, tuple, set)):
            stack.extend((v, depth + 1) for v in node)
    return None


def error_line(message: str, multiline: bool = False, max_lines: int = 40) -> str:
    """The CLI's `error: ...` text: printable, at most MAX_LINE characters a line; one line (line breaks shown as
    \\n) unless `multiline`, then at most `max_lines` lines."""
    if not multiline:
        return shorten(printable(message.strip()), MAX_LINE)
    lines = [shorten(printable(line), MAX_LINE) for line in message.strip().splitlines()]
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], f"  ... {len(lines) - max_lines + 1} more"]
    return "\n".join(lines)
