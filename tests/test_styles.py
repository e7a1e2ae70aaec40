"""Prompt styles as modules/styles.py applies them: `{prompt}` is replaced, otherwise the style is appended
with ", " (empty parts dropped, both stripped); styles apply in the order named; unknown names are empty."""

from __future__ import annotations

import pytest

from altdiff.styles import Style, StylesError, apply_styles, merge_prompts, read_styles


def test_merge_rules():
    assert merge_prompts("{prompt}, masterpiece", "a cat") == "a cat, masterpiece"
    assert merge_prompts("best, {prompt}, {prompt}", " a cat ") == "best,  a cat ,  a cat "  # no strip here
    assert merge_prompts(" oil painting ", " a cat ") == "a cat, oil painting"
    assert merge_prompts("oil painting", "") == "oil painting"
    assert merge_prompts("", " a cat ") == "a cat"


def test_apply_in_order_and_unknown_is_empty():
    styles = {"a": Style("a", "{prompt} in A", "neg A"), "b": Style("b", "B", "")}
    assert apply_styles("cat", ["a", "b"], styles) == "cat in A, B"
    assert apply_styles("cat", ["b", "a"], styles) == "cat, B in A"
    assert apply_styles("cat", ["a"], styles, negative=True) == "cat, neg A"
    assert apply_styles(" cat ", ["missing"], styles) == "cat"
    assert apply_styles(" cat ", [], styles) == " cat "


def test_read_webui_csv(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text('\ufeffname,prompt,negative_prompt\n# note,x,y\nfilm, "{prompt}, grain, 35mm",blur\n'
                    'old,plain,\n', encoding="utf-8")
    assert read_styles(path) == {"film": Style("film", "{prompt}, grain, 35mm", "blur"),
                                 "old": Style("old", "plain", "")}
    legacy = tmp_path / "legacy.csv"
    legacy.write_text("name,text\nx,words\n", encoding="utf-8")  # the old name,text format
    assert read_styles(legacy) == {"x": Style("x", "words", "")}
    bad = tmp_path / "bad.csv"
    bad.write_text("name,negative_prompt\nx,y\n", encoding="utf-8")
    with pytest.raises(StylesError, match="prompt"):
        read_styles(bad)
    with pytest.raises(StylesError, match="--styles-file"):
        read_styles(tmp_path / "missing.csv")
