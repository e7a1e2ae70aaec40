"""The webui's prompt styles (modules/styles.py): a styles.csv of name, prompt, negative_prompt, applied to a
request's prompts in the order the request names them."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str


class StylesError(ValueError):
    """A styles file altdiff cannot read (named in the message)."""


def read_styles(path: str | Path) -> dict[str, Style]:
    """The styles of a webui styles.csv: a header row naming `name`, `prompt` (or the old `text`) and
    optionally `negative_prompt`; rows whose name starts with '#' are comments; a later duplicate wins."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f, skipinitialspace=True))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise StylesError(f"--styles-file: cannot read {path}: {e}") from None
    styles = {}
    for k, row in enumerate(rows, start=2):
        if not row.get("name") or row["name"].startswith("#"):
            continue
        prompt = row.get("prompt", row.get("text"))
        if prompt is None:
            raise StylesError(f"--styles-file: {path} line {k}: expected a 'prompt' (or 'text') column")
        styles[row["name"]] = Style(row["name"], prompt or "", row.get("negative_prompt") or "")
    return styles


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """A style with `{prompt}` puts the prompt there; otherwise the non-empty, stripped prompt and style are
    joined with ", "."""
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles(prompt: str, names: list[str], styles: dict[str, Style], negative: bool = False) -> str:
    """The prompt (or negative prompt) after each named style in turn; an unknown name is an empty style, as
    in the webui (which still strips the prompt)."""
    for name in names:
        style = styles.get(name)
        text = "" if style is None else style.negative_prompt if negative else style.prompt
        prompt = merge_prompts(text, prompt)
    return prompt
