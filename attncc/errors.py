"""Errors raised by attncc.

`SpecError` is raised for any mistake in an ``.attn`` spec; its message always
names ``file:line:col``, repeats the offending source line and puts a caret under
the offending text, then says what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A location in a spec source.

    Attributes:
        file: file name (``"<string>"`` for specs given as text).
        line: 1-based line number.
        col: 1-based column of the first offending character.
        text: the whole source line (no trailing newline).
        length: number of characters to underline (at least 1).
    """

    file: str
    line: int
    col: int
    text: str
    length: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


class SpecError(ValueError):
    """A mistake in an ``.attn`` spec.

    The message has the form::

        file.attn:4:11: error: unknown name 'qq' (expected one of: b, h, q, kv, ...)
            mask: qq <= kv
                  ^^

    Attributes:
        span: the :class:`Span` of the offending text (may be ``None`` for errors
            that concern a whole file, e.g. an empty spec).
        reason: the message without location and caret.
    """

    def __init__(self, reason: str, span: Span | None = None):
        self.reason = reason
        self.span = span
        super().__init__(self._format())

    def _format(self) -> str:
        if self.span is None:
            return f"error: {self.reason}"
        sp = self.span
        line = sp.text.rstrip("\n")
        caret = " " * (sp.col - 1) + "^" * max(1, min(sp.length, max(1, len(line) - sp.col + 1)))
        return f"{sp}: error: {self.reason}\n    {line}\n    {caret}"


class MissingParamError(SpecError, TypeError):
    """A ``param`` without default left unset at :func:`attncc.compile`: a :class:`SpecError`
    pointing at the declaration, and a ``TypeError`` (a missing argument) as well."""
