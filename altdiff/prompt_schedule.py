"""Prompt editing and alternation as the webui reads them (modules/prompt_parser.py), without lark: a
right-to-left pass that parses the webui's grammar in linear time.

- `[from:to:when]`, `[to:when]`, `[from::when]`: `from` up to step `when`, `to` after it; `when` with a '.'
  is a fraction of the steps, else a step number (the webui's default, not its "old" scheduling).
- `[a|b|c]`: a different option each step, cycling; `[a|]` has an empty option.
- `(x)`, `(x:w)`, `[x]` stay as written for the emphasis parser (altdiff.prompts); brackets that close nothing
  are literal at the top level. A prompt the grammar cannot read at all (a `|` outside `[...]`, a trailing
  backslash) is used as it is, with no schedule, as the webui does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# The grammar's NUMBER (lark's SIGNED_NUMBER) between ':' and ']', with optional whitespace around it.
_WHEN = re.compile(r"\s*([+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)\s*\]")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_STRAY = re.compile(r"[][():]")  # what the top level may hold outside any construct


@dataclass
class Scheduled:
    before: list | None
    after: list
    when: str


@dataclass
class Alternate:
    options: list[list]


class _Parser:
    """The grammar's `prompt` and bracketed constructs, each construct read once (memoized)."""

    def __init__(self, text: str):
        self.text = text
        self.constructs: dict[int, tuple[int, list] | None] = {}

    def prompt(self, pos: int) -> tuple[int, list]:
        """The longest prompt from `pos`: its end and its items (str, list, Scheduled, Alternate)."""
        text, items = self.text, []
        while True:
            m = _PLAIN.match(text, pos)
            if m:
                items.append(m.group(0))
                pos = m.end()
                continue
            found = self.construct(pos) if text[pos:pos + 1] in ("[", "(") else None
            if found is None:
                return pos, items
            pos = found[0]
            items.append(found[1])

    def construct(self, start: int) -> tuple[int, list] | None:
        """The construct opened at `start` ('[' or '('): its end and items, or None when none closes."""
        if start in self.constructs:
            return self.constructs[start]
        text = self.text
        found = None
        end, first = self.prompt(start + 1)
        close = text[end:end + 1]
        if text[start] == "(":
            if close == ")":
                found = end + 1, ["(", first, ")"]
            elif close == ":":
                end2, second = self.prompt(end + 1)
                if text[end2:end2 + 1] == ")":
                    found = end2 + 1, ["(", first, ":", second, ")"]
        elif close == "]":
            found = end + 1, ["[", first, "]"]
        elif close == ":":
            when = _WHEN.match(text, end + 1)
            if when:
                found = when.end(), [Scheduled(None, first, when.group(1))]
            else:
                end2, second = self.prompt(end + 1)
                when = _WHEN.match(text, end2 + 1) if text[end2:end2 + 1] == ":" else None
                if when:
                    found = when.end(), [Scheduled(first, second, when.group(1))]
        elif close == "|":
            options = [first]
            while close == "|":
                end, option = self.prompt(end + 1)
                options.append(option)
                close = text[end:end + 1]
            if close == "]":
                found = end + 1, [Alternate(options)]
        self.constructs[start] = found
        return found


def parse(text: str) -> list | None:
    """The prompt's items, or None when the grammar cannot read it."""
    parser = _Parser(text)
    # Read the constructs right to left, so that an outer one finds its inner ones read (no deep recursion).
    for pos in range(len(text) - 1, -1, -1):
        if text[pos] in "[(":
            parser.construct(pos)
    items, pos = [], 0
    while pos < len(text):
        pos, found = parser.prompt(pos)
        items.append(found)
        if pos < len(text):
            stray = _STRAY.match(text, pos)
            if stray is None:
                return None
            items.append(stray.group(0))
            pos = stray.end()
    return items


def _walk(items: list, step: int | None):
    """Every item, depth first without recursion; at a `step`, only the branches taken at that step."""
    stack = [iter(items)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        yield item
        if isinstance(item, list):
            stack.append(iter(item))
        elif isinstance(item, Scheduled):
            branches = [item.before or [], item.after] if step is None else [
                (item.before or []) if step <= item.when else item.after]
            stack.append(iter(branches))
        elif isinstance(item, Alternate):
            taken = item.options if step is None else [item.options[(step - 1) % len(item.options)]]
            stack.append(iter(taken))


def _resolve_steps(items: list, steps: int, int_offset: int, flt_offset: float) -> set[int]:
    """Turn every `when` into a step (in place); the steps where the text may change."""
    found = {steps}
    for item in _walk(items, None):
        if isinstance(item, Scheduled):
            value = float(item.when)
            if not math.isfinite(value):
                raise ValueError(f"prompt: the step {item.when!r} of a prompt edit is not a finite number")
            value = (value - flt_offset) * steps if "." in item.when else value - int_offset
            item.when = min(steps, int(value))
            if item.when >= 1:
                found.add(item.when)
        elif isinstance(item, Alternate):
            found.update(range(1, steps + 1))
    return found


def prompt_schedule(prompt: str, base_steps: int, hires_steps: int | None = None) -> list[list]:
    """[[end_at_step, text], ...] for one prompt. With `hires_steps` (the hires pass), whole numbers count
    past the base steps and fractions past 1.0, as the webui's default scheduling does."""
    if hires_steps is None:
        steps, int_offset, flt_offset = base_steps, 0, 0.0
    else:
        steps, int_offset, flt_offset = hires_steps, base_steps, 1.0
    items = parse(prompt)
    if items is None:
        return [[steps, prompt]]
    return [[step, "".join(i for i in _walk(items, step) if isinstance(i, str))]
            for step in sorted(_resolve_steps(items, steps, int_offset, flt_offset))]
