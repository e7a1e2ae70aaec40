"""AUTOMATIC1111 prompt syntax and long prompts (altdiff.prompts) against hand-computed expectations: the
webui's own documented parses, chunk boundaries built from known token ids, and the emphasis formula."""

import numpy as np
import pytest
import torch

import altdiff
from altdiff.cli import build_parser
from altdiff.prompts import emphasize, parse_prompt_attention, tokenize_chunks

BOS, PAD, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def pipe(m9_folder):
    return altdiff.load(m9_folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def ids(pipe):
    """Token ids of "a" (one piece in the tiny vocabulary) and of ","."""
    a, comma = pipe.tokenizer.encode("a"), pipe.tokenizer.encode("a,")[1:]
    assert len(a) == 1 and len(comma) == 1 and pipe.tokenizer.encode("a a, a") == [a[0], a[0], comma[0], a[0]]
    return a[0], comma[0]


def words(n: int) -> str:
    return " ".join(["a"] * n)


@pytest.mark.parametrize("text,expected", [
    # The examples in the webui's parse_prompt_attention docstring.
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("((word:1.5))", [("word", 1.5 * 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("", [("", 1.0)]),
    ("word:1.2)", [("word:1.2)", 1.0)]),
])
def test_parse_prompt_attention(text, expected):
    parsed = parse_prompt_attention(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected])


def test_parse_refuses_malformed_weight():
    with pytest.raises(ValueError, match=r"'1\.2\.3' is not a number"):
        parse_prompt_attention("(a:1.2.3)")


def test_chunks_of_75_tokens(pipe, ids):
    a, _ = ids
    one = tokenize_chunks(pipe.tokenizer, words(75))
    assert [c.ids for c in one] == [[BOS] + [a] * 75 + [EOS]]
    two = tokenize_chunks(pipe.tokenizer, words(80))
    assert [c.ids for c in two] == [[BOS] + [a] * 75 + [EOS], [BOS] + [a] * 5 + [EOS] + [PAD] * 70]
    assert all(c.weights == [1.0] * 77 for c in two)
    short = tokenize_chunks(pipe.tokenizer, "a")
    assert short[0].ids == pipe.tokenizer("a")["input_ids"][0].tolist()  # a short prompt: diffusers' ids


def test_full_chunk_is_cut_after_a_near_comma(pipe, ids):
    a, comma = ids
    near = tokenize_chunks(pipe.tokenizer, words(70) + ", " + words(10))
    assert [c.ids for c in near] == [[BOS] + [a] * 70 + [comma, EOS] + [PAD] * 4,
                                     [BOS] + [a] * 10 + [EOS] + [PAD] * 65]
    # A comma more than 20 tokens back is not used: the chunk is simply full.
    far = tokenize_chunks(pipe.tokenizer, words(50) + ", " + words(30))
    assert [c.ids for c in far] == [[BOS] + [a] * 50 + [comma] + [a] * 24 + [EOS],
                                    [BOS] + [a] * 6 + [EOS] + [PAD] * 69]


def test_break_and_weights(pipe, ids):
    a, _ = ids
    chunks = tokenize_chunks(pipe.tokenizer, "(a:1.5) a [a] BREAK ((a))")
    assert [c.ids for c in chunks] == [[BOS, a, a, a, EOS] + [PAD] * 72, [BOS, a, EOS] + [PAD] * 74]
    assert chunks[0].weights[:5] == pytest.approx([1.0, 1.5, 1.0, 1 / 1.1, 1.0])
    assert chunks[1].weights[:3] == pytest.approx([1.0, 1.21, 1.0])
    assert chunks[0].weights[5:] == [1.0] * 72


def test_emphasize_restores_the_mean():
    z = torch.tensor([[[1.0], [3.0]], [[2.0], [2.0]]])  # two prompts, two tokens, width 1; means 2 and 2
    weights = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    # prompt 0: [1, 6] has mean 3.5, rescaled by 2/3.5; prompt 1 has weights 1 and stays as it is.
    expected = torch.tensor([[[2 / 3.5], [12 / 3.5]], [[2.0], [2.0]]])
    assert torch.allclose(emphasize(z, weights), expected)


def test_plain_prompt_is_unchanged(pipe):
    for text in ("一只戴着帽子的猫", ""):
        default = pipe.encode_prompt(text, "cpu", 1, True, negative_prompt="低质量")
        a1111 = pipe.encode_prompt(text, "cpu", 1, True, negative_prompt="低质量", a1111_prompts=True)
        assert all(torch.equal(x, y) for x, y in zip(default, a1111))


def test_weighted_prompt_embedding(pipe, ids):
    a, _ = ids
    embeds = pipe.encode_prompt("(a:1.5) a [a]", "cpu", 1, False, a1111_prompts=True)[0]
    tokens = torch.tensor([[BOS, a, a, a, EOS] + [PAD] * 72])
    with torch.no_grad():
        z = pipe.text_encoder(tokens, attention_mask=tokens.ne(PAD).long())
    weights = torch.tensor([1.0, 1.5, 1.0, 1 / 1.1] + [1.0] * 73)[None, :, None]
    expected = z * weights * (z.mean() / (z * weights).mean())
    assert torch.allclose(embeds, expected, atol=1e-6, rtol=0)
    assert (embeds - z).abs().max() > 0.1


def test_long_prompt_chunks_concatenate(pipe, ids):
    a, _ = ids
    embeds, negative = pipe.encode_prompt(words(300), "cpu", 1, True, negative_prompt="a", a1111_prompts=True)
    assert embeds.shape == negative.shape == (1, 4 * 77, 32)
    with torch.no_grad():
        chunk = pipe.text_encoder(torch.tensor([[BOS] + [a] * 75 + [EOS]]))
        empty = pipe.encode_prompt("", "cpu", 1, False)[0]
        short = pipe.encode_prompt("a", "cpu", 1, False)[0]
    for i in range(4):
        assert torch.allclose(embeds[:, 77 * i:77 * (i + 1)], chunk, atol=1e-6, rtol=0)
    # The negative prompt is padded with the empty prompt's encoding to as many chunks.
    assert torch.allclose(negative[:, :77], short, atol=1e-6, rtol=0)
    assert all(torch.allclose(negative[:, 77 * i:77 * (i + 1)], empty, atol=1e-6, rtol=0) for i in (1, 2, 3))
    # ... and the prompt, when the negative prompt is the longer one.
    embeds, negative = pipe.encode_prompt("a", "cpu", 1, True, negative_prompt=words(100), a1111_prompts=True)
    assert embeds.shape == negative.shape == (1, 154, 32)
    assert torch.allclose(embeds[:, 77:], empty, atol=1e-6, rtol=0)


def test_given_embeds_that_cannot_be_padded(pipe):
    with pytest.raises(ValueError, match="lengths 80 and 77 are not whole 77-token chunks"):
        pipe.encode_prompt(None, "cpu", 1, True, negative_prompt="a", prompt_embeds=torch.randn(1, 80, 32),
                           a1111_prompts=True)


def test_300_token_prompt_generates(pipe):
    prompt = " ".join(["a cat wearing a hat, (oil painting:1.3), BREAK mountains and a river at sunset"] * 10)
    assert len(pipe.tokenizer.encode(prompt)) >= 300
    kwargs = dict(negative_prompt="低质量", num_inference_steps=3, output_type="np", progress=False)
    long = pipe.generate(prompt, generator=torch.Generator().manual_seed(0), a1111_prompts=True,
                         **kwargs).images
    truncated = pipe.generate(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert long.shape == truncated.shape and np.isfinite(long).all()
    assert np.abs(long - truncated).max() * 255 > 5


def test_a1111_errors_and_cli_flag(pipe):
    with pytest.raises(ValueError, match="not a number"):
        pipe.generate("(a:1.2.3)", num_inference_steps=1, a1111_prompts=True, progress=False)
    result = pipe.generate("a", num_inference_steps=1, output_type="latent", progress=False)
    assert result.images.shape[0] == 1  # still usable after the error
    assert build_parser().parse_args(["x", "--a1111-prompts"]).a1111_prompts
    assert not build_parser().parse_args(["x"]).a1111_prompts


def test_multi_vector_embedding_moves_whole_into_the_next_chunk(m9_folder, tmp_path, ids):
    """sd_hijack_clip.tokenize_line: an embedding that does not fit in what is left of a chunk starts the next
    one; one that fits stays."""
    a, _ = ids
    pipe = altdiff.load(m9_folder, device="cpu", dtype=torch.float32)
    path = tmp_path / "tri.pt"
    torch.save({"string_to_param": {"*": torch.randn(3, 32)}, "name": "tri"}, path)
    tri = [pipe.tokenizer.added_tokens[t] for t in pipe.load_textual_inversion(path)]
    straddling = tokenize_chunks(pipe.tokenizer, words(73) + " tri a")
    assert [c.ids for c in straddling] == [[BOS] + [a] * 73 + [EOS, PAD, PAD],
                                           [BOS] + tri + [a, EOS] + [PAD] * 71]
    fitting = tokenize_chunks(pipe.tokenizer, words(72) + " (tri:1.5) a")
    assert [c.ids for c in fitting] == [[BOS] + [a] * 72 + tri + [EOS], [BOS, a, EOS] + [PAD] * 74]
    assert fitting[0].weights[73:76] == [1.5] * 3


def test_original_emphasis_mean_of_each_prompt(pipe, ids):
    """Two different prompts in one call: each chunk of each prompt is rescaled to its own mean, as the webui
    computes it (sd_emphasis.EmphasisOriginal on the texts of one encoder call, which prompt_parser makes one
    prompt)."""
    a, _ = ids
    texts = ["(a:1.5) a [a]", "a (a:0.5) " + words(80)]
    embeds = pipe.encode_prompt(texts, "cpu", 1, False, a1111_prompts=True)[0]
    assert embeds.shape == (2, 154, 32)
    expected = []
    for text in texts:
        chunks = tokenize_chunks(pipe.tokenizer, text)
        chunks += [tokenize_chunks(pipe.tokenizer, "")[0]] * (2 - len(chunks))
        states = []
        for chunk in chunks:
            tokens = torch.tensor([chunk.ids])
            with torch.no_grad():
                z = pipe.text_encoder(tokens, attention_mask=tokens.ne(PAD).long())
            weights = torch.tensor(chunk.weights)[None, :, None]
            states.append(z * weights * (z.mean() / (z * weights).mean()))  # the webui's formula, one prompt
        expected.append(torch.cat(states, dim=1))
    expected = torch.cat(expected)
    assert torch.allclose(embeds, expected, atol=1e-6, rtol=0)
    # The mean over both prompts (one encoder call for the batch) would give other states.
    with torch.no_grad():
        tokens = torch.tensor([tokenize_chunks(pipe.tokenizer, t)[0].ids for t in texts])
        z = pipe.text_encoder(tokens, attention_mask=tokens.ne(PAD).long())
    weights = torch.tensor([tokenize_chunks(pipe.tokenizer, t)[0].weights for t in texts])[:, :, None]
    batch_mean = z * weights * (z.mean() / (z * weights).mean())
    assert (batch_mean - expected[:, :77]).abs().max() > 1e-3


def test_unclosed_brackets_apply_one_by_one_in_linear_time():
    import time

    # Each unclosed '(' multiplies everything after it by 1.1, outermost first, as the webui does one by one.
    expected, weight = [], 1.0
    for i in range(6):
        weight *= 1.1
        expected.append((f"a{i}", weight))
    assert parse_prompt_attention("".join(f"(a{i}" for i in range(6))) == expected

    def cost(n: int) -> float:
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            # 1.1 ** n overflows float32 past n ~ 930: the whole parse runs, then the weight is refused
            with pytest.raises(ValueError, match="beyond float32"):
                parse_prompt_attention("(a" * n + "[b" * n)
            runs.append(time.perf_counter() - start)
        return min(runs)
    assert cost(32000) < 24 * cost(4000) + 0.1  # 8x the length: linear 8x, quadratic 64x


@pytest.mark.parametrize("text,expected", [
    # The webui's "Enable comments" option: '#' hides the text up to the end of its line.
    ("a cat # wearing a hat\non a mat", "a cat \non a mat"),
    ("# a whole line\na cat", "\na cat"),
    ("a cat\n# a whole line\non a mat", "a cat\non a mat"),
    ("a cat #", "a cat \n"),
    ("no comment (x:1.2)", "no comment (x:1.2)"),
])
def test_strip_comments(text, expected):
    from altdiff.prompts import strip_comments
    assert strip_comments(text) == expected


def test_emphasize_joint_mean_is_the_batch_mean():
    z = torch.tensor([[[1.0], [3.0]], [[2.0], [2.0]]])
    weights = torch.tensor([[1.0, 2.0], [1.0, 1.0]])
    # The batch holds 1, 3, 2, 2 (mean 2) and becomes 1, 6, 2, 2 (mean 11/4): all rescaled by 2 / (11/4).
    expected = z * weights[:, :, None] * (2 / (11 / 4))
    assert torch.allclose(emphasize(z, weights, joint_mean=True), expected)
    assert not torch.allclose(emphasize(z, weights), expected)


@pytest.mark.parametrize("prompt", ["(cat:" + "9" * 400 + ")", "(((cat:" + "9" * 20 + "):" + "9" * 20 + "):" + "9" * 20 + ")"])
def test_an_emphasis_weight_beyond_float32_is_refused_naming_the_prompt(prompt):
    """Before, the weight reached the embeddings as inf (or nan) and the image came out black."""
    with pytest.raises(ValueError, match="^prompt: the emphasis weight"):
        parse_prompt_attention(prompt)
