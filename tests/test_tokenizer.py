"""altdiff.tokenizer against transformers' slow XLMRobertaTokenizer on the fixture's sentencepiece model."""

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from altdiff.config import ConfigError
from altdiff.tokenizer import Tokenizer

PROMPTS = [
    "a cat wearing a hat, highly detailed oil painting",
    "A Photograph Of An Astronaut Riding A Horse",
    "一只戴着帽子的猫",
    "一幅美丽的风景画，山和河流，日落时分",
    "宇宙飛行士が月で馬に乗っている写真",
    "ひらがなとカタカナ、漢字",
    "모자를 쓴 고양이",
    "قطة ترتدي قبعة",
    "кошка в шляпе, красивый пейзаж",
    "टोपी पहने एक बिल्ली",
    "แมวใส่หมวก ทิวทัศน์ที่สวยงาม",
    "🐱🎩 a cat 😀 with emoji 👍🏽",
    "peinture à l'huile, Château, naïve café, São Paulo, Ærø, Łódź",
    "şapka takan bir kedi, con mèo đội mũ",
    "a cat 一只猫 кошка قطة 고양이 मिलना mixed scripts",
    "",
    " ",
    "   \t\n  ",
    "\u3000全角スペース\u3000",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
    "e\u0301 combining accent vs é",
    "a photo of a <mask> wearing a hat",
    "a <mask><mask> b  <mask>",
    # U+0085 is whitespace to Python (so <mask>'s lstrip eats it) but not to sentencepiece.
    "next line\x85<mask> and \x85 alone",
    "<mask> at the start and at the end <mask>",
    "end of sentence </s> then more",
    "<s>already has specials</s>",
    "<pad> <unk> literal specials",
    "<mask2> <MASK> </ s> not specials",
    "  leading and trailing spaces  ",
    "line one\nline two\r\nline three",
    "numbers 1234567890 and punctuation !?.,;:()[]{}",
    "zero\u200bwidth and non\u00a0breaking",
    "a cat wearing a hat " * 20,
    "猫" * 200,
]


@pytest.fixture(scope="module")
def tokenizers(m9_folder):
    from transformers import XLMRobertaTokenizer

    folder = m9_folder / "tokenizer"
    ref = XLMRobertaTokenizer(vocab_file=str(folder / "sentencepiece.bpe.model"), model_max_length=77)
    return Tokenizer.from_folder(folder), ref


def reference(ref, prompt, **kw):
    kw = {"padding": "max_length", "max_length": 77, "truncation": True, **kw}
    return ref(prompt, return_tensors="pt", **kw)


def test_prompt_list_covers_truncation(tokenizers):
    ours, _ = tokenizers
    assert len(PROMPTS) >= 30
    assert len(ours.encode(PROMPTS[-2])) > 75 and len(ours.encode(PROMPTS[-1])) > 75


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_and_mask_match_transformers(tokenizers, prompt):
    ours, ref = tokenizers
    got, want = ours(prompt), reference(ref, prompt)
    assert got["input_ids"].dtype == torch.long and got["attention_mask"].dtype == torch.long
    assert got["input_ids"].shape == (1, 77)
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert ours.encode(prompt) == ref.encode(prompt, add_special_tokens=False)


def test_batch_matches_transformers(tokenizers):
    ours, ref = tokenizers
    for kw in ({}, {"padding": "longest"}, {"padding": "longest", "max_length": 9},
               {"padding": "max_length", "max_length": 12}):
        got, want = ours(PROMPTS, **kw), reference(ref, PROMPTS, **kw)
        assert torch.equal(got["input_ids"], want["input_ids"]), kw
        assert torch.equal(got["attention_mask"], want["attention_mask"]), kw


def test_truncation_and_no_truncation(tokenizers):
    ours, ref = tokenizers
    long = PROMPTS[-2]
    ids = ours(long)["input_ids"][0]
    assert ids[0] == 0 and ids[-1] == 2 and (ids != 1).all()
    assert ids[1:-1].tolist() == ours.encode(long)[:75]
    for kw in ({"truncation": False}, {"truncation": False, "padding": False}, {"padding": False}):
        got, want = ours(long, **kw), reference(ref, long, **kw)
        assert torch.equal(got["input_ids"], want["input_ids"]), kw
        assert torch.equal(got["attention_mask"], want["attention_mask"]), kw
    assert ours(long, truncation=False)["input_ids"].shape[1] == len(ours.encode(long)) + 2 > 77


def test_special_ids_and_lengths(tokenizers):
    ours, ref = tokenizers
    assert (ours.bos_token_id, ours.pad_token_id, ours.eos_token_id, ours.unk_token_id) == (0, 1, 2, 3)
    assert ours.mask_token_id == ref.mask_token_id == len(ours.sp) + 1
    assert len(ours) == len(ref) == len(ours.sp) + 2
    assert ours.model_max_length == 77
    # sentencepiece's <unk> (id 0) becomes fairseq's 3; other pieces shift by one.
    assert ours.sp.PieceToId("\u263a") == 0
    assert ours.encode("\u263a")[-1] == 3 and ref.encode("\u263a", add_special_tokens=False)[-1] == 3
    assert ours.encode("a") == [ours.sp.PieceToId("\u2581a") + 1]


def test_decode_matches_transformers_and_round_trips(tokenizers):
    ours, ref = tokenizers
    for prompt in PROMPTS:
        ids = ours(prompt)["input_ids"][0]
        assert ours.decode(ids) == ref.decode(ids.tolist(), skip_special_tokens=True)
        assert ours.decode(ids, False) == ref.decode(ids.tolist(), skip_special_tokens=False)
    for prompt in ("a cat wearing a hat, highly detailed oil painting", "一只戴着帽子的猫",
                   "кошка в шляпе", "bellissimo paesaggio"):
        assert ours.decode(ours(prompt)["input_ids"][0]) == prompt
        assert ours.decode(ours.encode(prompt)) == prompt


def test_add_tokens_matches_transformers(m9_folder):
    from transformers import XLMRobertaTokenizer

    folder = m9_folder / "tokenizer"
    ours = Tokenizer.from_folder(folder)
    ref = XLMRobertaTokenizer(vocab_file=str(folder / "sentencepiece.bpe.model"), model_max_length=77)
    piece = ref.convert_ids_to_tokens(20)  # an existing piece keeps its id
    # A token that is a prefix of another: the longest match wins.
    new = ["<cat-toy>", "<cat>", piece, "<mask>", "<cat-toy>", "<cat-toy>-2"]
    ids = ours.add_tokens(new)
    ref.add_tokens(new)
    assert ids == [ref.convert_tokens_to_ids(t) for t in new]
    assert ids[2] == 20 and ids[3] == ours.mask_token_id and ids[0] == ids[4] == len(ours) - 3
    assert len(ours) == len(ref)
    for prompt in ("a <cat-toy> on a <cat>", "<cat-toy><cat> <mask>x", f"a{piece}b <cat-to <cat", "<cat-toy>",
                   "<cat-toy>-2 and <cat-toy>-3"):
        got = ours(prompt)["input_ids"]
        assert torch.equal(got, reference(ref, prompt)["input_ids"]), prompt
        assert ours.decode(got[0]) == ref.decode(got[0].tolist(), skip_special_tokens=True)
        assert ours.decode(got[0], False) == ref.decode(got[0].tolist(), skip_special_tokens=False)


def test_from_folder_model_max_length(m9_folder, tmp_path):
    shutil.copy(m9_folder / "tokenizer" / "sentencepiece.bpe.model", tmp_path)
    assert Tokenizer.from_folder(tmp_path).model_max_length == 77  # no tokenizer_config.json
    for value, expected in ((100, 100), (int(1e30), 77), (None, 77), ("77", 77), (True, 77), (1, 77)):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": value}))
        tok = Tokenizer.from_folder(tmp_path)
        assert tok.model_max_length == expected, value
    assert tok("a cat", padding="max_length")["input_ids"].shape == (1, 77)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 100}))
    assert Tokenizer.from_folder(tmp_path)("a cat")["input_ids"].shape == (1, 100)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.one_of(st.text(max_size=30),
                               st.sampled_from(["<mask>", "</s>", "<s>", "<pad>", "<unk>", " ", "\x85"])),
                     max_size=8).map("".join))
def test_any_text_encodes_like_transformers(tokenizers, text):
    ours, ref = tokenizers
    ids = ours(text, padding=False)["input_ids"][0].tolist()
    assert len(ids) <= 77 and ids[0] == 0 and 2 in ids
    assert ids == reference(ref, text, padding=False)["input_ids"][0].tolist()


def test_type_errors(tokenizers):
    ours, _ = tokenizers
    for bad in (None, 3, b"bytes", ["ok", 3], torch.tensor([1])):
        with pytest.raises(TypeError, match="prompt"):
            ours(bad)
    with pytest.raises(TypeError, match="text"):
        ours.encode(["a list"])
    with pytest.raises(TypeError, match="tokens"):
        ours.add_tokens("<single-string>")
    with pytest.raises(TypeError, match="tokens"):
        ours.add_tokens([""])


def test_value_errors(tokenizers, m9_folder):
    ours, _ = tokenizers
    with pytest.raises(ValueError, match="empty list"):
        ours([])
    for padding in ("do_not_pad", True, "max"):
        with pytest.raises(ValueError, match="padding"):
            ours("a cat", padding=padding)
    for max_length in (1, 0, -5, 7.0, "77"):
        with pytest.raises(ValueError, match="max_length"):
            ours("a cat", max_length=max_length)
    with pytest.raises(ValueError, match="cannot be batched"):
        ours(["a cat", "a cat wearing a hat"], padding=False)
    with pytest.raises(ValueError, match="cannot be batched"):
        ours(["a cat", PROMPTS[-2]], truncation=False)
    with pytest.raises(ValueError, match="ids"):
        ours.decode([0, len(ours) + 5])
    with pytest.raises(ValueError, match="ids"):
        ours.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="model_max_length"):
        Tokenizer(m9_folder / "tokenizer" / "sentencepiece.bpe.model", model_max_length=1)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Tokenizer(tmp_path / "missing.model")
    with pytest.raises(ConfigError, match="not found"):
        Tokenizer.from_folder(tmp_path)
    (tmp_path / "sentencepiece.bpe.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ConfigError, match="not a valid sentencepiece model"):
        Tokenizer.from_folder(tmp_path)
