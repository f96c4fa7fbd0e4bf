"""Final-answer extraction from model responses, in linear time.

A response's final answer is, in order of preference:

1. the content of the LAST ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces allowed; escaped
   braces ``\\{`` ``\\}`` do not count as grouping), or the token after ``\\boxed `` without braces;
2. else the rest of the LAST line that contains ``Answer:`` (DAPO-Math-17k's prompt asks for a
   last line ``Answer: $Answer``), without surrounding ``$`` / ``**`` / trailing full stop;
3. else ``None``.

If the last box is malformed (its braces never close, e.g. a response cut off mid-answer), the
response has no answer: we do not fall back to an earlier box, since the model's final word was
not an answer.

Cost bound: only the last ``MAX_EXAMINED_CHARS`` characters of a response are looked at (the
final answer sits at the end; a 1 MB response costs the same as a 16 KB one), and every scan is a
single left-to-right regex pass without backtracking, so extraction is O(MAX_EXAMINED_CHARS).
Model output is only scanned as text: never executed or eval'd.
"""

from __future__ import annotations

import re

MAX_EXAMINED_CHARS = 16384
"""Only this many trailing characters of a response are searched for the final answer."""

# `\boxed` / `\fbox` not followed by a letter (so `\boxedsomething` is another command).
# Literal alternatives with a single lookahead: no nested quantifiers, no backtracking blow-up.
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# Tokens that matter for brace matching: an escape pair (`\{`, `\}`, `\\`, ...) or a brace.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_ANSWER_MARKER = re.compile(r"answer\s{0,8}:", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """Return the final answer of ``text`` (see the module docstring), or None if there is none.

    The returned string is stripped; an empty box (``\\boxed{}``) counts as no answer.
    """
    if not isinstance(text, str):
        raise ValueError(f"response must be a str, got {type(text).__name__}")
    tail = text[-MAX_EXAMINED_CHARS:]
    last_box = None
    for last_box in _BOX_COMMAND.finditer(tail):  # noqa: B007 - we want the last match
        pass
    if last_box is not None:
        return _box_content(tail, last_box.end())
    return _answer_line(tail)


def _box_content(text: str, start: int) -> str | None:
    """Content of the box whose command ends at ``start``: ``{...}`` or a bare token."""
    position = start
    while position < len(text) and text[position] in " \t":
        position += 1
    if position >= len(text):
        return None
    if text[position] == "{":
        end = matching_brace(text, position)
        if end is None:
            return None
        return _nonempty(text[position + 1 : end])
    # `\boxed 42$` style: the argument runs to the next whitespace or math delimiter.
    end = position
    while end < len(text) and not text[end].isspace() and text[end] != "$":
        end += 1
    return _nonempty(text[position:end].rstrip("."))


def matching_brace(text: str, open_index: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_index``, or None if it never closes.

    Escaped braces (``\\{``, ``\\}``) are skipped. One regex pass: O(len(text)).
    """
    assert text[open_index] == "{"
    depth = 0
    for token in _BRACE_TOKEN.finditer(text, open_index):
        brace = token.group()
        if brace == "{":
            depth += 1
        elif brace == "}":
            depth -= 1
            if depth == 0:
                return token.start()
    return None


def braces_balanced(text: str) -> bool:
    """True if every unescaped ``{`` in ``text`` is closed and no ``}`` closes nothing."""
    depth = 0
    for token in _BRACE_TOKEN.finditer(text):
        brace = token.group()
        if brace == "{":
            depth += 1
        elif brace == "}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def _answer_line(text: str) -> str | None:
    """The rest of the line after the last ``Answer:`` marker, cleaned of decoration."""
    last_marker = None
    for last_marker in _ANSWER_MARKER.finditer(text):  # noqa: B007 - we want the last match
        pass
    if last_marker is None:
        return None
    line_end = text.find("\n", last_marker.end())
    line = text[last_marker.end() : line_end if line_end >= 0 else len(text)]
    # `**Answer:** $42$.` -> `42`; strip markdown bold, full stop, then math delimiters.
    answer = line.strip().strip("*").strip().rstrip(".").strip()
    if len(answer) >= 2 and answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$")
    elif answer.startswith("\\(") and answer.endswith("\\)"):
        answer = answer[2:-2]
    return _nonempty(answer)


def _nonempty(answer: str) -> str | None:
    answer = answer.strip()
    return answer or None
