"""XLM-R tokenizer: a sentencepiece BPE model with fairseq's id layout, giving the ids of transformers' slow
`XLMRobertaTokenizer` (the tokenizer AltDiffusion's pipelines call).

fairseq reserves ids 0-3 for `<s> <pad> </s> <unk>` and shifts every sentencepiece id by one;
sentencepiece's own `<unk>` (id 0) maps to 3, and `<mask>` takes the id after the last piece. Added tokens
(the specials, and later textual-inversion tokens) are cut out of the text before sentencepiece runs, as
transformers does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import sentencepiece as spm
import torch

from .config import ConfigError, read_json

MODEL_FILE = "sentencepiece.bpe.model"
DEFAULT_MAX_LENGTH = 77

# transformers declares `<mask>` with lstrip=True: the whitespace before it is swallowed, so "a <mask>" and
# "a<mask>" tokenize alike.
_LSTRIP_TOKENS = frozenset({"<mask>"})


class Tokenizer:
    """`tok(prompt)` gives what `XLMRobertaTokenizer(...)(prompt, padding="max_length", max_length=77,
    truncation=True, return_tensors="pt")` gives: a dict of `input_ids` and `attention_mask` LongTensors."""

    bos_token_id = 0
    pad_token_id = 1
    eos_token_id = 2
    unk_token_id = 3
    fairseq_offset = 1

    def __init__(self, model_file: str | Path, model_max_length: int = DEFAULT_MAX_LENGTH):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise ConfigError(f"{model_file}: sentencepiece model file not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(model_file))
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"{model_file}: not a valid sentencepiece model ({e})") from None
        if not _sane_max_length(model_max_length):
            raise ValueError(f"model_max_length must be an int >= 2, got {model_max_length!r}")
        self.model_max_length = model_max_length
        self.mask_token_id = len(self.sp) + self.fairseq_offset
        self.added_tokens: dict[str, int] = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3,
                                             "<mask>": self.mask_token_id}
        self.special_ids = frozenset(self.added_tokens.values())
        # Multi-vector textual-inversion tokens: the first token's id → the ids of all its vectors, so that
        # "tok" in a prompt stands for "tok tok_1 tok_2", as diffusers' maybe_convert_prompt makes it.
        self.expansions: dict[int, list[int]] = {}
        self._size = self.mask_token_id + 1
        self._update_splitter()

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """The pipeline's `tokenizer/` folder: `sentencepiece.bpe.model`, and `model_max_length` from
        `tokenizer_config.json` when that is a usable int (transformers writes 1e30 for "unset")."""
        folder = Path(folder)
        max_length = DEFAULT_MAX_LENGTH
        if (folder / "tokenizer_config.json").is_file():
            value = read_json(folder / "tokenizer_config.json").get("model_max_length")
            if _sane_max_length(value):
                max_length = value
        return cls(folder / MODEL_FILE, model_max_length=max_length)

    def __len__(self) -> int:
        return self._size

    def _update_splitter(self) -> None:
        # Longest first, so that at each position the longest added token wins, as transformers' trie does.
        alternatives = sorted(self.added_tokens, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

    def add_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Make each token an unsplittable added token; returns their ids. As transformers' `add_tokens`, a
        token that is already a vocabulary piece keeps that piece's id, and a new one gets the next free
        id."""
        if isinstance(tokens, str) or not all(isinstance(t, str) and t for t in tokens):
            raise TypeError(f"tokens must be a list of non-empty str, got {tokens!r}")
        ids = []
        for token in tokens:
            if token not in self.added_tokens:
                piece = self.sp.PieceToId(token)
                if piece:
                    self.added_tokens[token] = piece + self.fairseq_offset
                else:
                    self.added_tokens[token] = self._size
                    self._size += 1
            ids.append(self.added_tokens[token])
        self._update_splitter()
        return ids

    def remove_tokens(self, tokens: Sequence[str]) -> None:
        """Undo `add_tokens` (and their multi-vector expansions); the ids after the last remaining added token
        become free again."""
        for token in tokens:
            token_id = self.added_tokens.pop(token, None)
            self.expansions.pop(token_id, None)
        self._size = max(self.added_tokens.values()) + 1
        self._update_splitter()

    def _piece_to_id(self, piece: str) -> int:
        if piece in self.added_tokens:
            return self.added_tokens[piece]
        spm_id = self.sp.PieceToId(piece)
        return spm_id + self.fairseq_offset if spm_id else self.unk_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without `<s>`/`</s>` and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        # re.split with a group alternates plain text (even indices) and added tokens (odd indices).
        parts = self._splitter.split(text)
        for i in range(1, len(parts), 2):
            if parts[i] in _LSTRIP_TOKENS:
                parts[i - 1] = parts[i - 1].rstrip()
        ids = []
        for i, part in enumerate(parts):
            if i % 2:
                token_id = self.added_tokens[part]
                ids.extend(self.expansions.get(token_id, [token_id]))
            elif part:
                # Each plain chunk is encoded on its own, so sentencepiece adds its "▁" prefix per chunk.
                ids.extend(self._piece_to_id(p) for p in self.sp.encode(part, out_type=str))
        return ids

    def __call__(self, prompt: str | Sequence[str],
                 padding: Literal["max_length", "longest", False] = "max_length",
                 max_length: int | None = None, truncation: bool = True) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask`, both LongTensor[B, L]: `<s> ids </s>` padded on the right with
        `<pad>`. `max_length` (default `model_max_length`) bounds truncation and sets the "max_length"
        padding."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a str or a list of str, got {prompt!r:.80}")
        if not prompts:
            raise ValueError("prompt must not be an empty list")
        if padding not in ("max_length", "longest", False):
            raise ValueError(f"padding must be 'max_length', 'longest' or False, got {padding!r}")
        if max_length is None:
            max_length = self.model_max_length
        elif not _sane_max_length(max_length):
            raise ValueError(f"max_length must be an int >= 2 (room for <s> and </s>), got {max_length!r}")
        rows = []
        for p in prompts:
            ids = self.encode(p)
            if truncation:
                ids = ids[:max_length - 2]
            rows.append([self.bos_token_id, *ids, self.eos_token_id])
        longest = max(len(r) for r in rows)
        target = {"max_length": max_length, "longest": longest, False: 0}[padding]
        # Rows already longer than the target (truncation=False) stay as they are, as in transformers.
        lengths = [max(len(r), target) for r in rows]
        if len(set(lengths)) > 1:
            raise ValueError(f"prompts tokenize to different lengths {sorted(set(lengths))} with "
                             f"padding={padding!r}, truncation={truncation}; they cannot be batched")
        input_ids = torch.tensor([r + [self.pad_token_id] * (n - len(r)) for r, n in zip(rows, lengths)],
                                 dtype=torch.long)
        attention_mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r, n in zip(rows, lengths)],
                                      dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def _id_to_token(self, i: int) -> str:
        for token, token_id in self.added_tokens.items():
            if token_id == i:
                return token
        if not 0 <= i - self.fairseq_offset < len(self.sp):
            raise ValueError(f"ids contains {i}, outside the vocabulary (0..{len(self) - 1})")
        return self.sp.IdToPiece(i - self.fairseq_offset)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of `ids`, as transformers' `decode`: pieces joined with "▁" read as a space; tokens from
        `add_tokens` stand apart, separated by spaces."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids must be a 1-D sequence of ints, got a tensor of shape "
                                 f"{tuple(ids.shape)}")
            ids = ids.tolist()
        user_added = set(self.added_tokens.values()) - self.special_ids
        texts: list[str] = []
        pieces: list[str] = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in self.special_ids:
                continue
            if i in user_added:
                if _join(pieces):
                    texts.append(_join(pieces))
                pieces = []
                texts.append(self._id_to_token(i))
            else:
                pieces.append(self._id_to_token(i))
        if pieces:
            texts.append(_join(pieces))
        return " ".join(texts)


def _join(pieces: list[str]) -> str:
    return "".join(pieces).replace("\u2581", " ").strip()


def _sane_max_length(value) -> bool:
    # transformers stores int(1e30) when no length was configured; anything that large means "unset".
    return isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= 1_000_000
