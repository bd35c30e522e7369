"""Weighted captions: the WebUI's emphasis syntax in a caption, and how to keep it out.

``(text)`` weighs its tokens by 1.1, ``[text]`` by 1 / 1.1, ``(text:1.5)`` by 1.5; brackets nest
and multiply; ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the characters themselves. A
bracket left open weighs everything after it. This is how the A1111 and Forge WebUIs read a
prompt, and how kohya reads captions with ``weighted_captions``.
"""

from __future__ import annotations

import re

UP = 1.1  # the weight of one level of ( ); [ ] divides by it

_TOKENS = re.compile(r"""
    \\[()\[\]\\]            # an escaped bracket or backslash: the character itself
  | \\                      # a backslash before anything else: itself
  | \(                      # opens a weight
  | \[                      # opens a down-weight
  | :\s*([+-]?[.\d]+)\s*\)  # ':1.5)' closes a ( with its own weight
  | \)
  | \]
  | [^\\()\[\]:]+           # plain text
  | :
""", re.X)


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """``text`` as (fragment, weight) pairs in order, neighbours of one weight joined; a text
    without brackets is one fragment of weight 1."""
    parts: list[list] = []  # [fragment, weight]
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for m in _TOKENS.finditer(text):
        token, number = m.group(0), m.group(1)
        if token.startswith("\\") and len(token) == 2:
            parts.append([token[1], 1.0])
        elif token == "(":
            rounds.append(len(parts))
        elif token == "[":
            squares.append(len(parts))
        elif number is not None and rounds and _is_number(number):
            scale(rounds.pop(), float(number))
        elif token == ")" and rounds:
            scale(rounds.pop(), UP)
        elif token == "]" and squares:
            scale(squares.pop(), 1 / UP)
        else:
            parts.append([token, 1.0])
    for start in rounds:
        scale(start, UP)
    for start in squares:
        scale(start, 1 / UP)
    joined: list[tuple[str, float]] = []
    for fragment, weight in parts:
        if joined and joined[-1][1] == weight:
            joined[-1] = (joined[-1][0] + fragment, weight)
        else:
            joined.append((fragment, weight))
    return joined or [("", 1.0)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def escape_emphasis(text: str) -> str:
    """``text`` with its brackets and backslashes escaped: a WebUI reads it as the plain text."""
    return re.sub(r"([\\()\[\]])", r"\\\1", text)
