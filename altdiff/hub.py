"""Resolving a model source to a local diffusers-layout folder: a folder as it is, or a hub repo id through
huggingface_hub's cache (honours HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE like every hub library)."""

from __future__ import annotations

from pathlib import Path

from .weights import WEIGHT_NAMES, WeightsError, find_weights

COMPONENTS = ("text_encoder", "unet", "vae", "safety_checker")
CONFIG_PATTERNS = ["model_index.json", "*/config.json", "scheduler/scheduler_config.json",
                   "feature_extractor/preprocessor_config.json", "tokenizer/sentencepiece.bpe.model",
                   "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"]


def _missing_weights(folder: Path, variant: str | None, components: tuple[str, ...]) -> list[str]:
    """Components of a downloaded snapshot that still lack a weights file."""
    missing = []
    for comp in components:
        if not (folder / comp).is_dir():
            continue
        try:
            find_weights(folder / comp, variant)
        except WeightsError:
            missing.append(comp)
    return missing


def resolve(source: str | Path, variant: str | None = None, include_safety_checker: bool = True,
            components: tuple[str, ...] = COMPONENTS) -> Path:
    """A local folder is returned as is; anything else is a hub repo id downloaded (configs, tokenizer and
    one weights file per component of `components`: safetensors preferred, the `variant` file when asked)
    into the standard cache. Offline with a filled cache, nothing is fetched. `components=()` fetches only
    configs and the tokenizer (what a single file lacks)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.suffix in (".safetensors", ".ckpt", ".bin", ".pt") or path.exists():
        raise ValueError(f"model: {source!s} is a single file; load it with altdiff.load({str(source)!r}) or "
                         f"convert it with `python -m weights_convert {source} OUT_DIR`")
    if str(source).count("/") != 1:
        raise ValueError(f"model: {source!r} is neither a local folder nor a hub repo id of the form 'org/name'")
    from huggingface_hub import snapshot_download

    def fetch(suffix: str) -> Path:
        stems = [stem for stem, s in WEIGHT_NAMES if s == suffix]
        weights = [f"{c}/{s}{suffix}" for c in components for s in stems]
        if variant:
            weights += [f"{c}/{s}.{variant}{suffix}" for c in components for s in stems]
        patterns = CONFIG_PATTERNS + weights
        if not include_safety_checker:
            patterns = [p for p in patterns if not p.startswith(("safety_checker", "feature_extractor"))]
        return Path(snapshot_download(str(source), allow_patterns=patterns))

    try:
        folder = fetch(".safetensors")
        if _missing_weights(folder, variant, components):  # repos that only ship pickled weights
            folder = fetch(".bin")
    except Exception as e:
        raise ValueError(f"model: could not get {source!r} from the hub or its cache "
                         f"({type(e).__name__}: {e})") from None
    return folder
