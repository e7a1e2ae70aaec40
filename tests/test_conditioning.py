"""altdiff.conditioning against the webui's prompt_parser contract: schedules, the per-prompt encoder calls,
AND weights and the per-step batch rebuild."""

import lark
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from altdiff.conditioning import (
    get_learned_conditioning,
    get_learned_conditioning_prompt_schedules,
    get_multicond_learned_conditioning,
    get_multicond_prompt_list,
    reconstruct_cond_batch,
    reconstruct_multicond_batch,
)
from altdiff.prompt_schedule import parse


class RecordingEncoder:
    """A fake text encoder: one row per text, `tokens` rows of the text's hash; records each call's texts."""

    def __init__(self, tokens: dict[str, int] | None = None):
        self.calls: list[list[str]] = []
        self.tokens = tokens or {}

    def vector(self, text: str) -> torch.Tensor:
        return torch.full((self.tokens.get(text, 3), 2), float(sum(map(ord, text)) % 997))

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.stack([self.vector(t) for t in texts])


def test_plain_prompts_one_schedule_entry_ending_at_steps():
    assert get_learned_conditioning_prompt_schedules(["a cat", "a dog", "a cat"], 20) == [
        [[20, "a cat"]], [[20, "a dog"]], [[20, "a cat"]]]


def test_one_encoder_call_per_distinct_prompt_and_cache():
    encode = RecordingEncoder()
    conds = get_learned_conditioning(encode, ["a cat", "a dog", "a cat"], 20)
    assert encode.calls == [["a cat"], ["a dog"]]
    assert conds[0] is conds[2] and [c.end_at_step for c in conds[1]] == [20]
    assert torch.equal(conds[1][0].cond, encode.vector("a dog"))
    batch = reconstruct_cond_batch(conds, 5)
    assert batch.shape == (3, 3, 2) and torch.equal(batch[1], encode.vector("a dog"))


def test_and_free_multicond_weight_one():
    indexes, flat, index_of = get_multicond_prompt_list(["a cat", "a dog", "a cat"])
    assert indexes == [[(0, 1.0)], [(1, 1.0)], [(0, 1.0)]] and flat == ["a cat", "a dog"]
    assert index_of == {"a cat": 0, "a dog": 1}
    encode = RecordingEncoder({"a dog": 6})
    c = get_multicond_learned_conditioning(encode, ["a cat", "a dog"], 10)
    assert c.shape == (2,) and [[s.weight for s in b] for b in c.batch] == [[1.0], [1.0]]
    conds_list, tensor = reconstruct_multicond_batch(c, 1)
    assert conds_list == [[(0, 1.0)], [(1, 1.0)]] and tensor.shape == (2, 6, 2)
    # The shorter conditioning is padded by repeating its last vector (the webui's stack_conds).
    cat = encode.vector("a cat")
    assert torch.equal(tensor[0], torch.cat([cat, cat[-1:].repeat(3, 1)]))


# --- Prompt editing and alternation ---------------------------------------------------------------------

# The webui 1.10 prompt grammar (modules/prompt_parser.py), data for the lark oracle.
GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""
ORACLE = lark.Lark(GRAMMAR)


def oracle_parse(prompt: str) -> lark.Tree | None:
    try:
        return ORACLE.parse(prompt)
    except lark.exceptions.LarkError:
        return None


def oracle_schedule(prompt: str, steps: int) -> list[list]:
    """The schedule read from lark's parse tree, as the webui's prompt-editing wiki describes it."""
    tree = oracle_parse(prompt)
    if tree is None:
        return [[steps, prompt]]
    found = {steps}
    for node in tree.iter_subtrees():
        if node.data == "scheduled":
            number = str(node.children[-2])
            when = float(number) * steps if "." in number else float(number)
            node.children[-2] = min(steps, int(when))
            if node.children[-2] >= 1:
                found.add(node.children[-2])
        elif node.data == "alternate":
            found.update(range(1, steps + 1))

    def text(node, step: int) -> str:
        if node is None:
            return ""
        if isinstance(node, lark.Token):
            return "" if node.type == "NUMBER" else str(node)
        if node.data == "scheduled":
            before, after, _, when, _ = node.children
            return text(before, step) if step <= when else text(after, step)
        if node.data == "alternate":
            return text(node.children[(step - 1) % len(node.children)], step)
        return "".join(text(child, step) for child in node.children)
    return [[step, text(tree, step)] for step in sorted(found)]


def g(prompt: str, steps: int = 10, hires_steps: int | None = None) -> list[list]:
    return get_learned_conditioning_prompt_schedules([prompt], steps, hires_steps)[0]


@pytest.mark.parametrize("prompt,expected", [
    # The examples in the webui's get_learned_conditioning_prompt_schedules docstring (10 steps).
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[i, "a" if i % 2 else "(b:1.1)"] for i in range(1, 11)]),
    ("[fe|]male", [[i, "female" if i % 2 else "male"] for i in range(1, 11)]),
    ("[fe|||]male", [[i, "female" if i % 4 == 1 else "male"] for i in range(1, 11)]),
    # The wiki's "Prompt editing" example, at 100 steps (from the comment atop prompt_parser.py).
    ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
     "[ in background:0.25] [shoddy:masterful:0.5]", None),
    # Bad syntax is the prompt as written: a '|' outside brackets, a trailing backslash.
    ("a | b [c:3]", [[10, "a | b [c:3]"]]),
    ("(a|b) [c:3]", [[10, "(a|b) [c:3]"]]),
    ("a [b:3] \\", [[10, "a [b:3] \\"]]),
])
def test_documented_schedules(prompt, expected):
    if expected is None:
        expected = [[25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
                    [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
                    [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
                    [75, "fantasy landscape with a lake and an oak in background masterful"],
                    [100, "fantasy landscape with a lake and a christmas tree in background masterful"]]
        assert g(prompt, 100) == expected
    else:
        assert g(prompt) == expected == oracle_schedule(prompt, 10)


def test_hires_steps_count_past_the_base_steps():
    # The webui's docstring: whole numbers past the base steps, fractions past 1.0.
    assert g("a [b:.5] c", 10, 10) == [[10, "a b c"]]
    assert g("a [b:1.5] c", 10, 10) == [[5, "a  c"], [10, "a b c"]]
    assert g("a [b:13] c", 10, 20) == [[3, "a  c"], [20, "a b c"]]


def test_fraction_and_step_number_rules():
    assert g("[a:b:1.0]") == [[10, "a"]]  # a '.' makes it a fraction: all 10 steps
    assert g("[a:b:1]") == [[1, "a"], [10, "b"]]
    assert g("[a:b:0]") == g("[a:b:-2]") == [[10, "b"]]
    assert g("[a:b:1e1]") == [[10, "a"]]
    with pytest.raises(ValueError, match="finite"):
        g("[a:b:1e400]")


PIECES = st.sampled_from(["a", "b c", " ", "[", "]", "(", ")", ":", "|", "\\(", "\\", "0.5", "3", " 2 ", ".3",
                          "-1", "1e1", "x:2", "\n"])


CLEAN_PIECES = st.sampled_from(["a", "b c", " ", "\\(", "0.5", "3", " 2 ", ".3", "-1", "1e1", "\n"])


@st.composite
def prompts(draw, depth=0, pieces=PIECES):
    """Nested and mixed constructs, well formed or not (with stray brackets, `|` and backslashes among the
    pieces)."""
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 6 if depth < 3 else 0))
        if kind == 0:
            parts.append(draw(pieces))
        elif kind == 1:
            when = draw(st.sampled_from(["3", " .5 ", "12", "0", "1.0", "-1", "1e1"]))
            parts.append(f"[{draw(prompts(depth + 1, pieces))}:{draw(prompts(depth + 1, pieces))}:{when}]")
        elif kind == 2:
            parts.append(f"[{draw(prompts(depth + 1, pieces))}:{draw(st.sampled_from(['3', ' .5 ', '12']))}]")
        elif kind == 3:
            options = draw(st.lists(prompts(depth + 1, pieces), min_size=2, max_size=4))
            parts.append("[" + "|".join(options) + "]")
        elif kind == 4:
            parts.append(f"({draw(prompts(depth + 1, pieces))}:{draw(prompts(depth + 1, pieces))})")
        elif kind == 5:
            parts.append(f"[{draw(prompts(depth + 1, pieces))}]")
        else:
            parts.append(f"({draw(prompts(depth + 1, pieces))})")
    return "".join(parts)


@settings(max_examples=120, deadline=None)
@given(prompts(), st.integers(1, 12))
def test_schedules_equal_the_grammar_oracle(prompt, steps):
    """Every prompt the grammar reads is read (the rest is literal text), and the schedules are equal where
    lark reads the whole prompt as constructs. Where brackets that close nothing stand at the top level next
    to a construct, lark's Earley parse is ambiguous and its tie-break (by its internal order) may keep a
    valid construct as literal text; altdiff always reads the construct (the webui's `((a][:b:c [d:3]`)."""
    tree = oracle_parse(prompt)
    assert (parse(prompt) is None) == (tree is None)
    if tree is not None and not any(isinstance(child, lark.Token) for child in tree.children):
        assert g(prompt, steps) == oracle_schedule(prompt, steps)


@settings(max_examples=60, deadline=None)
@given(prompts(pieces=CLEAN_PIECES), st.integers(1, 12))
def test_well_formed_schedules_equal_the_grammar_oracle(prompt, steps):
    """Nested editing, alternation and emphasis without stray brackets: always the grammar's reading."""
    assert g(prompt, steps) == oracle_schedule(prompt, steps)


def test_schedule_is_linear_time():
    import time

    def cost(n: int) -> float:  # deep nesting, and many constructs that fail to close
        prompt = "[(" * n + "a:3" * n + "|b]" * n + "[a:" * n
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            g(prompt, 10)
            runs.append(time.perf_counter() - start)
        return min(runs)
    assert cost(16000) < 24 * cost(2000) + 0.1  # 8x the length: linear 8x, quadratic 64x


def test_scheduled_texts_share_one_encoder_call():
    encode = RecordingEncoder()
    conds = get_learned_conditioning(encode, ["a [cat:dog:2]", "[x|y] z", "a [cat:dog:2]"], 5)
    assert encode.calls == [["a cat", "a dog"], ["x z", "y z", "x z", "y z", "x z"]]
    assert [c.end_at_step for c in conds[0]] == [2, 5]
    assert [c.end_at_step for c in conds[1]] == [1, 2, 3, 4, 5]
    assert torch.equal(conds[1][2].cond, encode.vector("x z"))
    for step, expected in [(1, "a cat"), (2, "a cat"), (3, "a dog"), (5, "a dog"), (9, "a cat")]:
        assert torch.equal(reconstruct_cond_batch(conds, step)[0], encode.vector(expected))


def test_and_weights():
    indexes, flat, _ = get_multicond_prompt_list(["a cat AND a dog:1.5 AND a [cat:dog:3] : -0.5", "ANDROID"])
    assert flat == ["a cat", " a dog", " a [cat:dog:3]", "ANDROID"]  # the weight regex drops trailing space
    assert indexes == [[(0, 1.0), (1, 1.5), (2, -0.5)], [(3, 1.0)]]
    encode = RecordingEncoder()
    c = get_multicond_learned_conditioning(encode, ["a AND b:2", "b"], 4)
    conds_list, tensor = reconstruct_multicond_batch(c, 1)
    assert conds_list == [[(0, 1.0), (1, 2.0)], [(2, 1.0)]]
    assert torch.equal(tensor[1], encode.vector(" b")) and torch.equal(tensor[2], encode.vector("b"))


def test_plain_prompts_give_todays_embeddings(m9_folder):
    """On the tiny model: the conditioning of plain prompts (of one chunk count) is exactly what generate()'s
    a1111 prompt reading encodes today, for the prompt and for the negative prompt."""
    import altdiff
    from altdiff import prompts as prompt_reading

    pipe = altdiff.load(m9_folder, device="cpu", dtype=torch.float32)

    def encode(texts: list[str]) -> torch.Tensor:
        return prompt_reading.encode(pipe.tokenizer, pipe.text_encoder, texts, torch.device("cpu"),
                                     joint_mean=True)
    texts, negatives = ["a cat (on:1.2) a mat", "a dog"], ["", "ugly"]
    expected, expected_negative = pipe.encode_prompt(texts, "cpu", 1, True, negatives, a1111_prompts=True)
    _, cond = reconstruct_multicond_batch(get_multicond_learned_conditioning(encode, texts, 20), 1)
    uncond = reconstruct_cond_batch(get_learned_conditioning(encode, negatives, 20), 1)
    assert torch.equal(cond, expected) and torch.equal(uncond, expected_negative)
    edited = reconstruct_cond_batch(get_learned_conditioning(encode, ["a [cat:dog:5] (on:1.2) a mat"], 20), 6)
    assert not torch.equal(edited[0], expected[0])  # sensitivity: an edit at step 5 changes step 6
    # Both scheduled texts are one call, and the emphasis keeps their joint mean, as the webui's.
    assert torch.equal(edited[0], encode(["a cat (on:1.2) a mat", "a dog (on:1.2) a mat"])[1])
    assert not torch.equal(edited[0], encode(["a dog (on:1.2) a mat"])[0])


# The webui's weight regex for an AND sub-prompt (prompt_parser.re_weight), as the oracle of its reading.
WEBUI_WEIGHT = r"^(\s*.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$"


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from([" ", "\n", "\t", "a", ":", "1", ".", "-", "+", "\u0661", "\u3000"]), max_size=14))
def test_and_weights_read_as_the_webui_regex(sub):
    import re

    match = re.search(WEBUI_WEIGHT, sub)
    text, weight = match.groups() if match else (sub, None)
    indexes, flat, _ = get_multicond_prompt_list([sub])
    assert flat == [text] and indexes == [[(0, float(weight) if weight is not None else 1.0)]]


def test_and_weights_linear_time():
    import time

    def cost(n: int) -> float:
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            get_multicond_prompt_list(["a" + " " * n + "x AND b" + " " * n + ":1"])
            runs.append(time.perf_counter() - start)
        return min(runs)
    assert cost(80000) < 24 * cost(10000) + 0.1  # 8x the length: linear 8x, quadratic 64x
