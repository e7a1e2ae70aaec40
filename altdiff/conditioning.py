"""The webui's prompt conditioning data model (modules/prompt_parser.py), same names and behaviour: a prompt
becomes a schedule of texts (prompt editing `[a:b:when]`, alternation `[a|b]`), `AND` splits it into weighted
sub-prompts (composable diffusion), and each step's conditioning batch is rebuilt from the schedules.

`encode(texts) -> Tensor [len(texts), tokens, width]` stands for the webui's
`model.get_learned_conditioning`: one encoder call per prompt, given that prompt's scheduled texts together,
repeats included (the call pads them to one chunk count, and the webui's emphasis keeps the mean of the whole
call: `prompts.encode(..., joint_mean=True)`, where a repeated text weighs in the mean as often as it is
scheduled).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .prompt_schedule import prompt_schedule

Encode = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class ScheduledPromptConditioning:
    """`cond` is used up to and including step `end_at_step` (1-based, as the webui counts)."""

    end_at_step: int
    cond: torch.Tensor


@dataclass
class ComposableScheduledPromptConditioning:
    schedules: list[ScheduledPromptConditioning]
    weight: float = 1.0


@dataclass
class MulticondLearnedConditioning:
    shape: tuple
    batch: list[list[ComposableScheduledPromptConditioning]]


def get_learned_conditioning_prompt_schedules(prompts: list[str], base_steps: int,
                                              hires_steps: int | None = None) -> list[list[list]]:
    """[[end_at_step, text], ...] per prompt; identical prompts are parsed once."""
    schedules = {p: prompt_schedule(p, base_steps, hires_steps) for p in set(prompts)}
    return [schedules[p] for p in prompts]


def get_learned_conditioning(encode: Encode, prompts: list[str], steps: int,
                             hires_steps: int | None = None) -> list[list[ScheduledPromptConditioning]]:
    """Each prompt's schedule with its texts encoded: one `encode` call per distinct prompt, given all the
    prompt's scheduled texts, as the webui."""
    result, cache = [], {}
    schedules = get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps)
    for prompt, schedule in zip(prompts, schedules):
        if prompt not in cache:
            conds = encode([text for _, text in schedule])
            cache[prompt] = [ScheduledPromptConditioning(end, cond)
                             for (end, _), cond in zip(schedule, conds)]
        result.append(cache[prompt])
    return result


_AND = re.compile(r"\bAND\b")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?|\d*\.\d+)")


def _split_weight(sub: str) -> tuple[str, str | None]:
    """A sub-prompt's text and its trailing `:weight`, as the webui's weight regex reads it (text from the
    start, all leading whitespace kept, up to the last non-space before `: weight` or the trailing spaces; a
    line break after the text's first non-space means no match: the sub-prompt whole, weight 1), in linear
    time."""
    lead = len(sub) - len(sub.lstrip())
    rest = sub.rstrip()
    colon = rest.rfind(":")
    weight = rest[colon + 1:].lstrip() if colon >= 0 else ""
    if _NUMBER.fullmatch(weight):
        end = len(rest[:colon].rstrip())
    else:
        end, weight = len(rest), None
    end = max(end, lead)
    if "\n" in sub[lead:end]:
        return sub, None
    return sub[:end], weight


def get_multicond_prompt_list(
        prompts: list[str]) -> tuple[list[list[tuple[int, float]]], list[str], dict[str, int]]:
    """Split each prompt at `AND` into sub-prompts with an optional trailing `:weight` (default 1.0):
    per prompt its (index into the flat list, weight) pairs, the flat list of distinct sub-prompt texts, and
    text -> index."""
    indexes: list[list[tuple[int, float]]] = []
    flat: list[str] = []
    index_of: dict[str, int] = {}
    for prompt in prompts:
        pairs = []
        for sub in _AND.split(prompt):
            text, weight = _split_weight(sub)
            if text not in index_of:
                index_of[text] = len(flat)
                flat.append(text)
            value = float(weight) if weight is not None else 1.0
            if not math.isfinite(value):
                raise ValueError(f"prompt: the AND weight {weight[:40]!r} of {text[:40]!r} is not a finite number")
            pairs.append((index_of[text], value))
        indexes.append(pairs)
    return indexes, flat, index_of


def get_multicond_learned_conditioning(encode: Encode, prompts: list[str], steps: int,
                                       hires_steps: int | None = None) -> MulticondLearnedConditioning:
    """get_learned_conditioning over the AND-split sub-prompts, with their weights."""
    indexes, flat, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(encode, flat, steps, hires_steps)
    batch = [[ComposableScheduledPromptConditioning(learned[i], weight) for i, weight in pairs]
             for pairs in indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


def _at_step(schedules: list[ScheduledPromptConditioning], current_step: int) -> torch.Tensor:
    """The first entry still running at `current_step`; past the last end, the first (as the webui)."""
    return next((entry.cond for entry in schedules if current_step <= entry.end_at_step), schedules[0].cond)


def reconstruct_cond_batch(c: list[list[ScheduledPromptConditioning]], current_step: int) -> torch.Tensor:
    """[len(c), tokens, width]: each prompt's conditioning at `current_step`; all must have one length, as in
    the webui (which writes them into a tensor shaped like the first)."""
    conds = [_at_step(schedules, current_step) for schedules in c]
    shapes = {tuple(cond.shape) for cond in conds}
    if len(shapes) > 1:
        raise ValueError(f"reconstruct_cond_batch: conditionings of different shapes {sorted(shapes)}; "
                         "the webui needs one length for every prompt of the batch")
    return torch.stack(conds)


def reconstruct_multicond_batch(c: MulticondLearnedConditioning,
                                current_step: int) -> tuple[list[list[tuple[int, float]]], torch.Tensor]:
    """Every sub-prompt's conditioning at `current_step`, stacked, and per prompt its (row, weight) pairs;
    shorter conditionings are padded by repeating their last vector, as the webui's stack_conds does."""
    tensors: list[torch.Tensor] = []
    conds_list = []
    for composable in c.batch:
        rows = []
        for sub in composable:
            rows.append((len(tensors), sub.weight))
            tensors.append(_at_step(sub.schedules, current_step))
        conds_list.append(rows)
    tokens = max(t.shape[0] for t in tensors)
    tensors = [torch.cat([t, t[-1:].expand(tokens - t.shape[0], -1)]) for t in tensors]
    return conds_list, torch.stack(tensors)
