"""The webui's extra networks in a prompt, for one generate() call: `<lora:NAME:…>` tags (parsed by
altdiff.prompts.parse_tags) found as files in a LoRA folder and made active, embeddings found by name, and the
infotext's "Lora hashes" / "TI hashes" fields. The adapters themselves are altdiff.lora's."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import lora, textual_inversion
from .prompts import LoraTag, parse_tags
from .weights import WeightsError, file_hash, file_stamp

if TYPE_CHECKING:
    from .pipeline import Pipeline


def find_lora(lora_dir: str | Path, name: str) -> Path:
    """The file `<lora:NAME>` means: a .safetensors/.pt/.ckpt file anywhere under `lora_dir` whose stem is
    NAME, else a .safetensors file whose `ss_output_name` metadata (its alias in the webui) is NAME."""
    root = Path(lora_dir).expanduser()
    if not root.is_dir():
        raise ValueError(f"lora_dir: {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in lora.LORA_DIR_SUFFIXES and p.is_file())
    found = [p for p in files if p.stem == name]
    if not found:
        found = [p for p in files if p.suffix.lower() == ".safetensors" and _alias(p) == name]
    if not found:
        raise ValueError(f"prompt: <lora:{name}>: no file named {name} ({'/'.join(lora.LORA_DIR_SUFFIXES)}) in "
                         f"{root} or its subfolders")
    if len(found) > 1:
        raise ValueError(f"prompt: <lora:{name}> is ambiguous in {root}: {', '.join(map(str, found))}")
    return found[0]


def _alias(path: Path) -> str | None:
    try:
        return lora._metadata(path).get("ss_output_name")
    except WeightsError:
        return None


def lora_hash(path: str | Path) -> str:
    """The webui's short hash of a LoRA file (network.py NetworkOnDisk): the `sshs_model_hash` metadata that
    kohya and LyCORIS write, else the addnet hash for .safetensors and sha256 for other files; 12 digits."""
    path = Path(path)
    full = lora._metadata(path).get("sshs_model_hash") or file_hash(path, addnet=path.suffix == ".safetensors")
    return full[:12]


def hashes_field(named_files: dict[str, Path], hash_fn) -> str:
    """"NAME: hash, ..." as the webui's "Lora hashes" / "TI hashes" infotext fields (":" and "," dropped from
    names)."""
    return ", ".join(f"{name.translate(_NAME_SYMBOLS)}: {hash_fn(p)}" for name, p in named_files.items())


_NAME_SYMBOLS = str.maketrans("", "", ":,")


@dataclass
class PromptNetworks:
    """What `prompt_networks` gives generate(): the prompts without their tags, and the infotext fields for
    the networks they named."""

    prompt: str | list[str] | None
    infotext: dict[str, str] = field(default_factory=dict)


@contextmanager
def prompt_networks(pipe: Pipeline, prompt: str | list[str] | None, negative_prompt: str | list[str] | None, *,
                    a1111_prompts: bool, lora_dir: str | Path | None = None,
                    embeddings_dir: str | Path | None = None) -> Iterator[PromptNetworks]:
    """For one generate() call (the caller holds the pipeline's lock): with `a1111_prompts`, the `<lora:…>`
    tags of the prompt are removed and their files, found in `lora_dir`, are active at their multipliers;
    embeddings in `embeddings_dir` named by a word of the prompt or negative prompt are loaded. Everything is
    taken off again on leaving. As in the webui, tags are read from the prompt only, and adapters apply to the
    whole batch: every prompt of the call must carry the same tags. Adapters read for tags stay cached
    (inactive) until a call names other files, so repeating a tag does not re-read its file."""
    texts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    tags: list[LoraTag] = []
    if a1111_prompts and any("<" in t for t in texts):
        parsed = [parse_tags(t) for t in texts]
        if any(p[1] != parsed[0][1] for p in parsed):
            raise ValueError("prompt: every prompt of one call must carry the same <lora:…> tags (adapters act on "
                             "the whole batch)")
        stripped = [p[0] for p in parsed]
        prompt, tags = (stripped[0] if isinstance(prompt, str) else stripped), parsed[0][1]
        names = [t.name for t in tags]
        if len(set(names)) != len(names):
            raise ValueError(f"prompt: a LoRA is named twice in {names}")
        if tags and lora_dir is None:
            raise ValueError(f"prompt: <lora:{tags[0].name}:…> needs lora_dir, the folder to find {tags[0].name} in")
    files = {t.name: find_lora(lora_dir, t.name) for t in tags}
    negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt or [])
    active: list[str] = []
    try:
        if tags:
            _activate_tags(pipe, tags, files, active)
        with textual_inversion.prompt_embeddings(pipe, texts + negatives, embeddings_dir) as embeddings:
            infotext = {}
            if files:
                infotext["Lora hashes"] = hashes_field(files, lora_hash)
            if embeddings:
                infotext["TI hashes"] = hashes_field(embeddings, textual_inversion.embedding_hash)
            yield PromptNetworks(prompt, infotext)
    finally:
        if pipe.lora is not None:
            for name in active:
                pipe.lora.weights.pop(name, None)


def _activate_tags(pipe: Pipeline, tags: list[LoraTag], files: dict[str, Path], active: list[str]) -> None:
    """Load (or reuse) each tag's adapter and make it active at its multipliers, adding its name to `active`
    as soon as it is (so a failure part way leaves nothing active behind)."""
    state = lora._state(pipe)
    wanted = {files[t.name].resolve(): t for t in tags}
    for path, (_, name) in list(state.tagged.items()):
        if path not in wanted or state.tagged[path][0] != file_stamp(path):
            lora._detach(state, name)
            del state.tagged[path]
    for path, tag in wanted.items():
        if path not in state.tagged:
            name = f"<lora:{tag.name}>"
            while name in state.loaded or any(name == n for _, n in state.tagged.values()):
                name += "'"
            lora._attach(pipe, name, lora.read_lora(pipe, path))
            state.tagged[path] = (file_stamp(path), name)
        name = state.tagged[path][1]
        active.append(name)
        state.weights[name] = {"text_encoder": tag.te, "unet": tag.unet}

