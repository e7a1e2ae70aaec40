"""python -m weights_convert SRC OUT [--dtype fp16|bf16|fp32] [--tokenizer DIR_OR_REPO]
[--safety-checker DIR_OR_REPO|none] [--config m9|m18|auto] [--image-size N] [--config-json FILE]
[--ema|--no-ema] [--to-original] [--quiet]"""

from __future__ import annotations

import argparse
import sys

from altdiff.config import ConfigError, read_json
from altdiff.pipeline import DTYPES

from .convert import convert, to_original


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m weights_convert",
        description="Convert AltDiffusion weights: an original single file (.ckpt/.safetensors) or a diffusers "
                    "folder (.bin or safetensors) → a diffusers-layout safetensors folder; with --to-original, "
                    "a diffusers folder → one original file for the AUTOMATIC1111 webui.")
    parser.add_argument("src", metavar="SRC")
    parser.add_argument("out", metavar="OUT", help="a new folder (or .safetensors/.ckpt file with --to-original)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="cast weights (default: keep)")
    parser.add_argument("--tokenizer", metavar="DIR_OR_REPO",
                        help="tokenizer source for a single file (default: BAAI/AltDiffusion-m9 or -m18)")
    parser.add_argument("--safety-checker", metavar="DIR_OR_REPO|none", default=None,
                        help="safety checker source for a single file (default: the BAAI repo; 'none' for none)")
    parser.add_argument("--config", choices=["auto", "m9", "m18"], default=None,
                        help="architecture of a single file (default: detected from the tensors)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="training resolution of a single file, sets the sample sizes (default: the file's "
                             "stored config, else 512)")
    parser.add_argument("--config-json", metavar="FILE",
                        help="JSON of config overrides, e.g. {\"text_encoder\": {\"num_attention_heads\": 4}}")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                        help="use the EMA UNet weights of a single file (default: when present)")
    parser.add_argument("--to-original", action="store_true", help="diffusers folder → one original file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if args.to_original:
            to_original(args.src, args.out, dtype=dtype, progress=not args.quiet)
        else:
            options = read_json(args.config_json) if args.config_json else None
            flags = {"architecture": args.config, "image_size": args.image_size, "ema": args.ema}
            if options is not None or any(v is not None for v in flags.values()):
                options = {**(options or {}), **{k: v for k, v in flags.items() if v is not None}}
            checker = args.safety_checker
            safety_checker = True if checker is None else (None if checker.lower() == "none" else checker)
            convert(args.src, args.out, dtype=dtype, tokenizer=args.tokenizer, safety_checker=safety_checker,
                    config=options, progress=not args.quiet)
    except (ValueError, ConfigError) as e:
        print(f"weights_convert: error: {e}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
