"""The text sent to the LLM and the parsing of its answer.

Request (the authors' convention): the skill's instruction with ``{n}`` (prompts asked for) and
``{max_words}`` filled in, then the k in-context examples as a numbered list ``1. ...`` to
``k. ...``. A completions model continues the list at ``k+1.``; a chat model usually answers
with the list, often inside some prose. Every numbered or bulleted line of the answer is a
candidate; other lines (prose, headings, blank lines) are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# "4. text", "4) text", "(4) text", "4: text", "- text", "* text", "• text". A number followed by a
# digit ("3.5 metres") is not a list marker.
_ITEM = re.compile(r"^\s*(?:\(?\d{1,4}(?:[.):](?!\d))|[-*•–])\s*(?P<text>.*)$")
_WRAPPERS = (("**", "**"), ("*", "*"), ("_", "_"), ("`", "`"), ('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"))


def request_text(instruction: str, examples: list[str], n: int, max_words: int) -> str:
    """The prompt sent to the LLM: the instruction (``{n}`` and ``{max_words}`` replaced; other
    braces are left alone) followed by the examples as a numbered list."""
    head = instruction.replace("{n}", str(n)).replace("{max_words}", str(max_words)).rstrip()
    listing = "\n".join(f"{number}. {example.strip()}" for number, example in enumerate(examples, start=1))
    return f"{head}\n\n{listing}\n"


def clean_item(text: str) -> str:
    """One candidate without list decoration: surrounding quotes or markdown emphasis removed,
    whitespace collapsed."""
    text = " ".join(text.split())
    while True:
        for opening, closing in _WRAPPERS:
            if text.startswith(opening) and text.endswith(closing) and len(text) > len(opening) + len(closing):
                text = text[len(opening) : -len(closing)].strip()
                break
        else:
            return text


@dataclass(frozen=True)
class ParsedAnswer:
    """Candidates found in one answer; ``cut_off`` counts items dropped because the answer was
    cut at the token limit (its last item is then unfinished)."""

    candidates: list[str]
    cut_off: int = 0


def parse_answer(text: str | None, *, truncated: bool = False) -> ParsedAnswer:
    """Candidates from an LLM answer: every numbered or bulleted line, cleaned.

    ``truncated`` (finish_reason "length") drops the last item, which the token limit cut short.
    """
    items = []
    for line in (text or "").splitlines():
        match = _ITEM.match(line)
        if match:
            items.append(clean_item(match.group("text")))
    if truncated and items:
        return ParsedAnswer(candidates=items[:-1], cut_off=1)
    return ParsedAnswer(candidates=items)
