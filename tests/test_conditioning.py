"""altdiff.conditioning against the webui's prompt_parser contract: schedules, the per-prompt encoder calls,
AND weights and the per-step batch rebuild."""

import torch

from altdiff.conditioning import (
    get_learned_conditioning,
    get_learned_conditioning_prompt_schedules,
    get_multicond_learned_conditioning,
    get_multicond_prompt_list,
    reconstruct_cond_batch,
    reconstruct_multicond_batch,
)


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
