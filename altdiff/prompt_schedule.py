"""Prompt editing and alternation as the webui reads them (modules/prompt_parser.py)."""

from __future__ import annotations


def prompt_schedule(prompt: str, base_steps: int, hires_steps: int | None = None) -> list[list]:
    """[[end_at_step, text], ...] for one prompt."""
    return [[base_steps if hires_steps is None else hires_steps, prompt]]
