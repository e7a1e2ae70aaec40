"""Textual-inversion embeddings (A1111 and diffusers files) on AltDiffusion's XLM-R text encoder: new rows
in the word embeddings and unsplittable tokens in the tokenizer, as diffusers' load_textual_inversion.

`prompt_embeddings` adds, for one generate() call, the embeddings of a folder that the prompts name by file
stem, as the webui's embeddings folder works (modules/textual_inversion/textual_inversion.py: the token is the
file name without its extension).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .checks import all_finite
from .weights import WeightsError, file_hash, read_state_dict

if TYPE_CHECKING:
    from .pipeline import Pipeline

TI_FILE_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")  # the webui's embedding files (its image embeddings aside)


def _read_embedding_file(path: Path):
    """The raw content of an embedding file: a dict (safetensors, or a weights_only pickle) or a tensor."""
    if path.suffix == ".safetensors":
        return read_state_dict(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise WeightsError(f"{path}: unreadable embedding file; only weights_only loading is allowed "
                           f"({type(e).__name__}: {first_line})") from None


def read_embedding(path: str | Path, token: str | None = None) -> tuple[str, torch.Tensor]:
    """(token, vectors [n, width]) of a textual-inversion file: A1111 `.pt` (`string_to_param["*"]`, token
    from `name`), A1111 `.safetensors` (`emb_params`, token from the file name), diffusers
    `learned_embeds.*` (`{token: vector(s)}`), or a bare tensor (token required). `token` overrides."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / n for n in TI_FILE_NAMES if (path / n).is_file()]
        if not found:
            raise WeightsError(f"{path}: no embedding file (looked for {', '.join(TI_FILE_NAMES)})")
        path = found[0]
    if not path.is_file():
        raise WeightsError(f"{path}: embedding file not found")
    data = _read_embedding_file(path)
    if isinstance(data, torch.Tensor):
        name, vectors = None, data
    elif isinstance(data, dict) and isinstance(data.get("string_to_param"), dict) and \
            isinstance(data["string_to_param"].get("*"), torch.Tensor):
        name, vectors = data.get("name"), data["string_to_param"]["*"]
    elif isinstance(data, dict) and isinstance(data.get("emb_params"), torch.Tensor):
        name, vectors = path.stem, data["emb_params"]
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        name, vectors = next(iter(data.items()))
    else:
        raise WeightsError(f"{path}: not a textual-inversion embedding (expected A1111 string_to_param or "
                           f"emb_params, or diffusers' {{token: tensor}})")
    token = token if token is not None else name
    if not isinstance(token, str) or not token:
        raise ValueError(f"token: {path} names no token; pass token=...")
    if not vectors.is_floating_point() or vectors.ndim not in (1, 2) or not vectors.numel():
        raise WeightsError(f"{path}: embedding must be a float tensor [width] or [vectors, width], "
                           f"got {vectors.dtype} {tuple(vectors.shape)}")
    if not all_finite(vectors):
        raise WeightsError(f"{path}: the embedding contains NaN or inf")
    return token, vectors.reshape(-1, vectors.shape[-1])


def load_textual_inversion(pipe: Pipeline, path: str | Path, token: str | None = None) -> list[str]:
    """Add an embedding's vectors as new tokens: rows appended to the XLM-R word embeddings and unsplittable
    tokens in the tokenizer. A multi-vector embedding becomes `token`, `token_1`, ... (diffusers' naming), and
    `token` in a prompt stands for all of them. Returns the added tokens; on error nothing changes."""
    token, vectors = read_embedding(path, token)
    with pipe.lock:
        return _add(pipe, path, token, vectors)


def _add(pipe: Pipeline, path: str | Path, token: str, vectors: torch.Tensor) -> list[str]:
    """load_textual_inversion's change, under the caller's lock."""
    tokenizer, embeddings = pipe.tokenizer, pipe.text_encoder.roberta.embeddings.word_embeddings
    width = embeddings.weight.shape[1]
    if vectors.shape[1] != width:
        raise WeightsError(f"{path}: embedding width {vectors.shape[1]} does not fit this text encoder "
                           f"(hidden size {width}); it was made for another model")
    tokens = [token] + [f"{token}_{i}" for i in range(1, len(vectors))]
    taken = [t for t in tokens if t in tokenizer.added_tokens or tokenizer.sp.PieceToId(t)]
    if taken:
        raise ValueError(f"token: {taken} already in the tokenizer's vocabulary; choose another token")
    with torch.no_grad():
        ids = tokenizer.add_tokens(tokens)
        if len(ids) > 1:
            tokenizer.expansions[ids[0]] = ids
        weight = embeddings.weight
        rows = max(weight.shape[0], max(ids) + 1)
        grown = torch.cat([weight, weight.new_zeros(rows - weight.shape[0], width)])
        grown[ids] = vectors.to(grown)
        embeddings.weight = nn.Parameter(grown, requires_grad=False)
        embeddings.num_embeddings = rows
        pipe.text_encoder.config.vocab_size = rows
    return tokens


def embedding_hash(path: str | Path) -> str:
    """The webui's short hash of an embedding file: sha256 of the whole file, 12 digits
    (textual_inversion.py Embedding.set_hash(hashes.sha256(...)))."""
    return file_hash(path)[:12]


def find_embeddings(embeddings_dir: str | Path) -> dict[str, Path]:
    """Embedding files under `embeddings_dir` (subfolders too, as the webui walks it) by file stem."""
    root = Path(embeddings_dir).expanduser()
    if not root.is_dir():
        raise ValueError(f"embeddings_dir: {root} is not a folder")
    found: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file() and path.stat().st_size:
            found.setdefault(path.stem, []).append(path)
    twice = {stem: paths for stem, paths in found.items() if len(paths) > 1}
    if twice:
        stem, paths = next(iter(twice.items()))
        raise ValueError(f"embeddings_dir: {stem!r} names {len(paths)} files: {', '.join(map(str, paths))}")
    return {stem: paths[0] for stem, paths in found.items()}


def mentioned(word: str, texts: list[str]) -> bool:
    """Whether `word` stands as a word of its own in one of `texts` (how a prompt names an embedding)."""
    pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")
    return any(pattern.search(t) for t in texts)


@contextmanager
def prompt_embeddings(pipe: Pipeline, texts: list[str], embeddings_dir: str | Path | None
                      ) -> Iterator[dict[str, Path]]:
    """For one call (the caller holds the pipeline's lock): load the embeddings of `embeddings_dir` whose
    file stem is a word of `texts` (token = the stem), yield {stem: file} of those, and take them off again
    after. Stems the tokenizer already knows (an embedding loaded for good) are left to it."""
    if embeddings_dir is None:
        yield {}
        return
    tokenizer = pipe.tokenizer
    used = {stem: path for stem, path in find_embeddings(embeddings_dir).items()
            if stem not in tokenizer.added_tokens and mentioned(stem, texts)}
    embeddings = pipe.text_encoder.roberta.embeddings.word_embeddings
    weight, vocab_size = embeddings.weight, pipe.text_encoder.config.vocab_size
    added: list[str] = []
    try:
        for stem, path in used.items():
            try:
                added += _add(pipe, path, *read_embedding(path, stem))
            except ValueError as e:
                raise type(e)(f"embeddings_dir: {e}") from None
        yield used
    finally:
        tokenizer.remove_tokens(added)
        embeddings.weight, embeddings.num_embeddings = weight, weight.shape[0]
        pipe.text_encoder.config.vocab_size = vocab_size
