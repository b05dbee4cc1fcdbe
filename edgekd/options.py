"""Comma-separated command-line values (`--formats onnx,torch`, `--batch 1,8`, `--severities 1,3`): split,
converted to integers, checked against the allowed names."""

from __future__ import annotations

from edgekd.errors import EdgeKDError


def split_list(text: str | None, option: str | None = None) -> list[str] | None:
    """'a, b,c' -> ['a', 'b', 'c']; None or '' (the option not given) -> None. With `option` named, a blank item
    beside others ('1,,8', ',onnx', 'onnx,': an unset shell variable) is an error naming it; without, dropped."""
    if not text:
        return None
    items = [t.strip() for t in text.split(",")]
    if option is not None and any(items) and not all(items):
        raise EdgeKDError(f"{option} {text!r}: a blank item in the comma-separated list (an unset variable?)")
    return [t for t in items if t]


def given_list(text: str | None, option: str) -> list[str] | None:
    """split_list for an option's value: None when the option was not given; given but blank ('' or ',') is an
    error naming `option` (an unset shell variable had fallen back to the default without a word)."""
    if text is None:
        return None
    items = split_list(text, option)
    if not items:
        raise EdgeKDError(f"{option} {text!r}: nothing given (a comma-separated list; leave the option out for "
                          "the default)")
    return items


def int_list(text: str | None, option: str) -> list[int] | None:
    """'1, 3,5' -> [1, 3, 5]; None or '' -> None; anything not an integer is an error naming `option`."""
    try:
        return [int(t) for t in split_list(text, option)] if text else None
    except ValueError:
        raise EdgeKDError(f"{option}: expected comma-separated integers, got '{text}'") from None


def parse_list(text: str | list[str] | None, allowed: tuple[str, ...], option: str) -> list[str]:
    """At least one of `allowed` (lowercase names; given in any case), in the order given, each once."""
    items = [i.lower() for i in (text if isinstance(text, list) else split_list(text, option) or [])]  # FP32, OpenVINO
    for item in items:
        if item not in allowed:
            raise EdgeKDError(f"{option}: unknown value '{item}' (choose from {', '.join(allowed)})")
    if not items:
        raise EdgeKDError(f"{option}: give at least one of {', '.join(allowed)}")
    return list(dict.fromkeys(items))


MAX_BENCH_BATCH = 1024
"""The largest batch `edgekd bench` times: each is built in memory from repeated images, and larger ones had
filled the machine's memory (22 GB at 100000 images of 28 px) before a figure came out."""


def parse_batches(text: str | list[int]) -> list[int]:
    """`--batch`: batch sizes in [1, MAX_BENCH_BATCH], sorted, each once."""
    batches = text if isinstance(text, list) else int_list(str(text), "--batch") or []
    if not batches or any(not 1 <= b <= MAX_BENCH_BATCH for b in batches):
        raise EdgeKDError(f"--batch: batch sizes must be in [1, {MAX_BENCH_BATCH}], got '{text}'")
    return sorted(set(batches))
