"""AUTOMATIC1111-style prompts: emphasis `(word:1.2)`, `(word)` = x1.1, `[word]` = /1.1, `\\(` escapes, the
`BREAK` keyword, and prompts of any length, encoded in 75-token chunks and concatenated along the sequence
axis, as the webui does (modules/prompt_parser.parse_prompt_attention and
sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase with its XLM-R subclass).

Each chunk is `<s>` + 75 tokens + `</s>`, padded with `<pad>` after the first `</s>` (the webui's XLM-R
path), encoded alone; the encoder's output for each token is multiplied by the token's weight and the chunk is
rescaled to its unweighted mean (the webui's "Original" emphasis, sd_emphasis.py: `z.mean()` over the chunk of
every text the encoder was given at once). The webui gives the encoder one prompt at a time
(prompt_parser.get_learned_conditioning loops over the prompts of a batch; only a prompt's scheduled texts,
altdiff.conditioning, go together), so the mean is that prompt's own: here too, per prompt and per
chunk, and an image does not depend on the other prompts of its batch. A multi-vector textual-inversion
embedding that would straddle a chunk boundary moves whole into the next chunk, as in the webui's
sd_hijack_clip.tokenize_line.

`<lora:NAME:w>` tags are taken out of a prompt by `parse_tags` (altdiff.networks.prompt_networks applies them) before
the rest is read.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
from dataclasses import dataclass

import torch

from .text_encoder import TextEncoder
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_TAG = re.compile(r"<(\w+):([^>]+)>")  # modules/extra_networks.py re_extra_net
LORA_TAGS = ("lora", "lyco")  # the Lora extension registers "lyco" as an alias of "lora"


@dataclass(frozen=True)
class LoraTag:
    """`<lora:NAME:w>`, `<lora:NAME:te:unet>` or `<lora:NAME:te=w:unet=w>`, read as extra_networks_lora.py
    reads them: te defaults to 1, unet to te."""

    name: str
    te: float
    unet: float


def _tag(kind: str, args: str) -> LoraTag:
    items = args.split(":")
    named = dict(p.split("=", 1) for p in items if p.count("=") == 1)  # ExtraNetworkParams: "k=v" is named
    positional = [p for p in items if p.count("=") != 1]
    text = f"<{kind}:{args}>"
    if not positional or not positional[0]:
        raise ValueError(f"prompt: {text} names no LoRA")
    if len(positional) > 3 or "dyn" in named:
        raise ValueError(f"prompt: {text}: a DyLoRA dimension (dyn) is not supported")
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown:
        raise ValueError(f"prompt: {text}: unknown setting(s) {unknown}; expected te= and unet=")

    def number(value: str) -> float:
        try:
            result = float(value)
        except ValueError:
            raise ValueError(f"prompt: {text}: multiplier {value!r} is not a number") from None
        if not math.isfinite(result):
            raise ValueError(f"prompt: {text}: multiplier {value!r} is not finite")
        return result
    te = number(named.get("te", positional[1] if len(positional) > 1 else "1"))
    unet = number(named["unet"]) if "unet" in named else number(positional[2]) if len(positional) > 2 else te
    return LoraTag(positional[0], te, unet)


def parse_tags(text: str) -> tuple[str, list[LoraTag]]:
    """The prompt with every `<name:...>` tag removed (as the webui removes them), and its LoRA tags. A
    hypernetwork tag is refused (not supported); other names are removed with a warning, as the webui skips
    networks it does not know."""
    tags: list[LoraTag] = []

    def found(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2)
        if kind in LORA_TAGS:
            tags.append(_tag(kind, args))
        elif kind == "hypernet":
            raise ValueError(f"prompt: {m.group(0)}: hypernetworks are not supported")
        else:
            logger.warning("prompt: skipping %s: no extra network called %r", m.group(0), kind)
        return ""
    return _TAG.sub(found, text), tags



_LINE_COMMENT = re.compile(r"(^|\n)#[^\n]*(\n|$)")
_TRAILING_COMMENT = re.compile(r"#[^\n]*(\n|$)")


def strip_comments(text: str) -> str:
    """The prompt without `#` comments (from '#' to the end of the line, the line break kept), as the webui
    1.10 reads prompts by default ("Enable comments", modules/processing_scripts/comments.py): before the
    `<lora:...>` tags, AND, prompt editing and emphasis are read."""
    return _TRAILING_COMMENT.sub("\n", _LINE_COMMENT.sub("\n", text))


_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|     # escapes, and a lone backslash
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|         # ':1.2)' closes a weighted group
\)|]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND, SQUARE = 1.1, 1 / 1.1
BREAK_WEIGHT = -1.0  # marks the ("BREAK", -1) entries of a parse
COMMA_BACKTRACK = 20  # the webui's comma_padding_backtrack default


class _Runs:
    """The parsed text as runs of consecutive pieces of one weight. The webui multiplies every piece from a
    bracket's opening on, one by one; a run takes the multiplication once for all its pieces (split where an
    opening falls inside it), so each piece sees the same products in the same order, and unclosed brackets
    cost linear time."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.starts: list[int] = []  # the index of each run's first piece
        self.weights: list[float] = []

    def append(self, piece: str, weight: float) -> None:
        if not self.weights or self.weights[-1] != weight:
            self.starts.append(len(self.pieces))
            self.weights.append(weight)
        self.pieces.append(piece)

    def multiply(self, start: int, factor: float) -> None:
        """Multiply the weight of every piece from `start` on."""
        if start == len(self.pieces):
            return
        run = bisect.bisect_right(self.starts, start) - 1
        if self.starts[run] != start:
            run += 1
            self.starts.insert(run, start)
            self.weights.insert(run, self.weights[run - 1])
        for i in range(run, len(self.weights)):
            self.weights[i] *= factor

    def merged(self) -> list[tuple[str, float]]:
        """Adjacent runs of equal weight joined, as the webui merges its pieces."""
        result: list[tuple[list[int], float]] = []
        for i, weight in enumerate(self.weights):
            end = self.starts[i + 1] if i + 1 < len(self.starts) else len(self.pieces)
            if result and result[-1][1] == weight:
                result[-1][0][1] = end
            else:
                result.append(([self.starts[i], end], weight))
        return [("".join(self.pieces[a:b]), weight) for (a, b), weight in result]


FLOAT32_MAX = 3.4028234663852886e38


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) runs of a prompt, with ("BREAK", -1.0) where a chunk must end; unclosed brackets
    apply to the end of the prompt, adjacent runs of equal weight merge. A1111's own examples:
    'a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).' → [('a ', 1.0), ('house', 1.573), (' ', 1.1),
    ('on', 1.0), (' a ', 1.1), ('hill', 0.55), (', sun, ', 1.1), ('sky', 1.4641), ('.', 1.1)]."""
    runs = _Runs()
    round_open: list[int] = []
    square_open: list[int] = []
    for m in _ATTENTION.finditer(text):
        part, weight = m.group(0), m.group(1)
        if part.startswith("\\"):
            runs.append(part[1:], 1.0)
        elif part == "(":
            round_open.append(len(runs.pieces))
        elif part == "[":
            square_open.append(len(runs.pieces))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(f"prompt: {weight!r} is not a number, in {part!r} of {text!r}") from None
            runs.multiply(round_open.pop(), factor)
        elif part == ")" and round_open:
            runs.multiply(round_open.pop(), ROUND)
        elif part == "]" and square_open:
            runs.multiply(square_open.pop(), SQUARE)
        else:
            for i, piece in enumerate(_BREAK.split(part)):
                if i:
                    runs.append("BREAK", BREAK_WEIGHT)
                runs.append(piece, 1.0)
    for start in round_open:
        runs.multiply(start, ROUND)
    for start in square_open:
        runs.multiply(start, SQUARE)
    merged = runs.merged() or [("", 1.0)]
    # e.g. (cat:999...9): a weight beyond float32 becomes inf in the embeddings and the image black
    bad = next((run for run in merged if not abs(run[1]) <= FLOAT32_MAX), None)
    if bad is not None:
        raise ValueError(f"prompt: the emphasis weight of {bad[0][:40]!r} is {bad[1]:.3g}, beyond float32")
    return merged


@dataclass
class Chunk:
    """One encoder call's worth: `chunk_length + 2` token ids and their weights."""

    ids: list[int]
    weights: list[float]


def tokenize_chunks(tokenizer: Tokenizer, text: str, comma_backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """Split a prompt into chunks of `model_max_length - 2` tokens (75): a chunk ends at BREAK, or when full;
    a full chunk whose last comma is at most `comma_backtrack` tokens back is cut after that comma and the
    rest moves to the next chunk; a multi-vector embedding that does not fit in the chunk starts the next
    one."""
    size = tokenizer.model_max_length - 2
    comma = tokenizer.sp.PieceToId(",")
    comma_id = comma + tokenizer.fairseq_offset if comma else None
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close(ids: list[int], weights: list[float]) -> None:
        nonlocal last_comma
        pad = size - len(ids)
        chunks.append(Chunk([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
                            + [tokenizer.pad_token_id] * pad, [1.0, *weights] + [1.0] * (pad + 1)))
        last_comma = -1

    for piece, weight in parse_prompt_attention(text):
        if piece == "BREAK" and weight == BREAK_WEIGHT:
            close(ids, weights)
            ids, weights = [], []
            continue
        tokens, position = tokenizer.encode(piece), 0
        while position < len(tokens):
            token = tokens[position]
            # A multi-vector embedding's first id stands for all its vectors (altdiff.textual_inversion).
            length = len(tokenizer.expansions.get(token, (token,)))
            if length > size:
                raise ValueError(f"prompt: an embedding of {length} vectors cannot fit in a {size}-token chunk")
            if token == comma_id:
                last_comma = len(ids)
            elif len(ids) == size and 0 <= last_comma and len(ids) - last_comma <= comma_backtrack:
                cut = last_comma + 1
                close(ids[:cut], weights[:cut])
                ids, weights = ids[cut:], weights[cut:]
            if len(ids) + length > size:
                close(ids, weights)
                ids, weights = [], []
            ids += tokens[position:position + length]
            weights += [weight] * length
            position += length
    if ids or not chunks:
        close(ids, weights)
    return chunks


def emphasize(z: torch.Tensor, weights: torch.Tensor, joint_mean: bool = False) -> torch.Tensor:
    """Multiply each token's state by its weight, then restore the mean (A1111 "Original"): each prompt's, or
    with `joint_mean` the whole batch's, as the webui does for the texts it encodes at once (the scheduled
    texts of one prompt)."""
    dims = (0, 1, 2) if joint_mean else (1, 2)
    original_mean = z.mean(dim=dims, keepdim=True)
    z = z * weights[:, :, None]
    return z * (original_mean / z.mean(dim=dims, keepdim=True))


def encode(tokenizer: Tokenizer, text_encoder: TextEncoder, texts: list[str], device: torch.device,
           clip_skip: int | None = None, joint_mean: bool = False) -> torch.Tensor:
    """[len(texts), chunks * model_max_length, width]: every prompt's chunks, encoded and emphasized; prompts
    with fewer chunks are filled with empty ones (`<s></s>` and padding), as the webui does. `joint_mean`:
    the texts are one webui encoder call (altdiff.conditioning's `encode`), emphasis keeps their joint mean."""
    batch = [tokenize_chunks(tokenizer, t) for t in texts]
    empty = tokenize_chunks(tokenizer, "")[0]
    states = []
    for i in range(max(len(chunks) for chunks in batch)):
        chunks = [c[i] if i < len(c) else empty for c in batch]
        ids = torch.tensor([c.ids for c in chunks], device=device)
        weights = torch.tensor([c.weights for c in chunks], device=device, dtype=text_encoder.dtype)
        mask = ids.ne(tokenizer.pad_token_id).long() if text_encoder.config.use_attention_mask else None
        z = text_encoder(ids, attention_mask=mask, clip_skip=clip_skip)
        states.append(emphasize(z, weights, joint_mean))
    return torch.cat(states, dim=1)


def pad_to_same_length(a: torch.Tensor, b: torch.Tensor,
                       empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Give the shorter of two encodings (a prompt and its negative) extra chunks of `empty`, the encoded
    empty prompt [1, chunk, width], as the webui pads cond / uncond."""
    length = max(a.shape[1], b.shape[1])

    def pad(x: torch.Tensor) -> torch.Tensor:
        missing = length - x.shape[1]
        if missing % empty.shape[1]:
            raise ValueError(f"prompt_embeds/negative_prompt_embeds: lengths {a.shape[1]} and "
                             f"{b.shape[1]} are not whole {empty.shape[1]}-token chunks; cannot pad to match")
        return torch.cat([x, empty.to(x).expand(x.shape[0], -1, -1).repeat(1, missing // empty.shape[1], 1)],
                         dim=1)
    return pad(a), pad(b)
