"""Hostile and broken input over every public surface (generate(), load(), adapters, the CLI, `altdiff batch`,
the weights reader, the converter) in one table; numbers given as numpy and torch scalars; output paths and
file modes; the fp16 VAE retry end to end; thread safety; tokenizer properties."""

import contextlib
import importlib
import io
import json
import os
import pickle
import re
import shutil
import struct
import threading
import time
import traceback
import unicodedata
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import PIL.Image
import pytest
import tiny
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import altdiff
from altdiff import batch, cli
from altdiff.config import ConfigError
from altdiff.images import open_image
from altdiff.tokenizer import Tokenizer
from altdiff.weights import WeightsError, read_state_dict

PROMPT = "a cat wearing a hat"


@pytest.fixture(scope="module")
def pipe(m9_folder):
    return altdiff.load(m9_folder, device="cpu")


def probe(pipe) -> np.ndarray:
    return pipe.generate(PROMPT, num_inference_steps=1, seed=0, output_type="np", progress=False).images


@pytest.fixture(scope="module")
def inputs(pipe, tmp_path_factory):
    """The probe image of the untouched pipeline, odd PNGs and a decompression bomb, made once."""
    folder = tmp_path_factory.mktemp("inputs")
    bomb = folder / "bomb.png"
    bomb.write_bytes(png_header_only(10_000, 10_000))
    return SimpleNamespace(probe=probe(pipe), pngs=odd_pngs(folder), bomb=bomb)


# --- hostile files --------------------------------------------------------------------------------------------

class Payload:
    """Unpickling this runs a shell command that creates `marker`: a loader must never execute it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_payload(path: Path, style: str) -> Path:
    obj = {"state_dict": {"w": Payload(path.parent / "PWNED")}}
    if style == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    return path


def empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size and holds no pixels: opening it costs nothing, decoding it would."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def odd_pngs(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    images = {
        "16bit": PIL.Image.fromarray((rng.random((32, 32)) * 65535).astype(np.uint16)),
        "palette": PIL.Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).quantize(16),
        "rgba": PIL.Image.fromarray((rng.random((32, 32, 4)) * 255).astype(np.uint8), "RGBA"),
        "la": PIL.Image.fromarray((rng.random((32, 32, 2)) * 255).astype(np.uint8), "LA"),
    }
    images["palette"].info["transparency"] = 0
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, img in images.items():
        img.save(folder / f"{name}.png")
        paths[name] = folder / f"{name}.png"
    return paths


def broken_model(ctx, part: str, change: Callable[[Path], Any]) -> Path:
    """A copy of the tiny model folder with `change` applied to `part` (a file inside it)."""
    folder = ctx.tmp / "model"
    shutil.copytree(ctx.folder, folder)
    change(folder / part)
    return folder


UNET = "unet/diffusion_pytorch_model.safetensors"


def edit_state_dict(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        sd = load_file(path)
        edit(sd)
        save_file(sd, path)
    return change


def edit_json(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return change


def load_broken(part: str, change: Callable[[Path], Any]) -> Callable:
    return lambda ctx: altdiff.load(broken_model(ctx, part, change), device="cpu")


def config_edit(part: str, **values) -> Callable:
    """Load a copy of the tiny model whose `part` config.json has `values` set."""
    return load_broken(part, edit_json(lambda c: c.update(values)))


def lora_file(path: Path, down_value: float = 0.5, alpha: float = 2.0) -> Path:
    """A kohya LoRA for one attention projection of the tiny UNet, with `down_value` in its down weight."""
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    down = torch.randn(2, 32)
    down[0, 0] = down_value
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": torch.randn(32, 2),
               f"{key}.alpha": torch.tensor(alpha)}, str(path))
    return path


def embedding_file(path: Path, value: float) -> Path:
    """An A1111 textual-inversion embedding for the tiny text encoder (width 32) holding `value`."""
    vectors = torch.randn(2, 32)
    vectors[1, 3] = value
    torch.save({"string_to_param": {"*": vectors}, "name": "hostile-embedding"}, path)
    return path


def run_cli(main, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own refusals
            rc = e.code
    return rc, err.getvalue()


def gen(**kwargs) -> Callable:
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    return lambda ctx: ctx.pipe.generate(progress=False, **kwargs)


def gen_lazy(make: Callable[[Any], dict]) -> Callable:
    return lambda ctx: gen(**make(ctx))(ctx)


def img2img(name: str) -> Callable:
    return lambda ctx: ctx.pipe.generate(PROMPT, image=open_image(ctx.pngs[name]), strength=0.5,
                                         num_inference_steps=4, output_type="np", progress=False)


def cli_args(*argv: str, model: bool = True, output: str = "{out}/img.png") -> Callable:
    def run(ctx):
        # Defaults first: argparse keeps the last value, so a case's own --steps wins.
        args = ["--model", str(ctx.folder), "--steps", "2"] if model else []
        args += [*argv, "-o", output, "--quiet"]
        return run_cli(cli.main, [a.format(tmp=ctx.tmp, out=ctx.out, bomb=ctx.bomb, png16=ctx.pngs["16bit"])
                                  for a in args])
    return run


def batch_args(*argv: str) -> Callable:
    """`altdiff batch` on a one-request file: the case's arguments must be refused before any work."""
    def run(ctx):
        requests = ctx.tmp / "requests.jsonl"
        requests.write_text(json.dumps({"prompt": PROMPT, "num_inference_steps": 2}) + "\n")
        args = [str(requests), "--model", str(ctx.folder), *argv, "--quiet"]
        return run_cli(cli.batch_main, [a.format(tmp=ctx.tmp, out=ctx.out) for a in args])
    return run


def convert_args(make: Callable[[Any], list[str]]) -> Callable:
    def run(ctx):
        from weights_convert.__main__ import main
        return run_cli(main, [*make(ctx), "--quiet"])
    return run


def nan_callback(pipe, i, t, tensors):
    return {"latents": torch.full_like(tensors["latents"], float("nan"))}


@dataclass
class Case:
    id: str
    run: Callable
    expect: Any  # an exception type, an exit code (CLI), or None: the input is valid and must work
    match: str = ""


L = torch.randn(1, 4, 16, 16)
U8 = (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)  # an HxWx3 uint8 picture
NAN, INF = float("nan"), float("inf")
META = torch.device("meta")
CASES = [
    # generate(): sizes, counts, numbers
    Case("height_not_multiple_of_8", gen(height=12), ValueError, "height: must be a positive multiple of 8"),
    Case("width_zero", gen(width=0), ValueError, "width: must be a positive multiple of 8"),
    Case("height_negative", gen(height=-64), ValueError, "height: must be a positive multiple of 8"),
    Case("size_huge", gen(height=800_000, width=800_000), ValueError, "height/width: .* larger than"),
    Case("steps_zero", gen(num_inference_steps=0), ValueError, "num_inference_steps: must be a positive int"),
    Case("steps_negative", gen(num_inference_steps=-5), ValueError, "num_inference_steps"),
    Case("steps_float", gen(num_inference_steps=2.5), ValueError, "num_inference_steps"),
    Case("guidance_nan", gen(guidance_scale=float("nan")), ValueError, "guidance_scale: must be a finite number"),
    Case("guidance_string", gen(guidance_scale="7.5"), ValueError, "guidance_scale"),
    Case("guidance_rescale_out_of_range", gen(guidance_rescale=1.5), ValueError, "guidance_rescale"),
    Case("eta_negative", gen(eta=-1.0), ValueError, "eta"),
    Case("images_per_prompt_zero", gen(num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
    Case("strength_above_1", gen(image=torch.rand(1, 3, 32, 32), strength=1.5), ValueError,
         r"strength: must be in \[0.0, 1.0\]"),
    Case("strength_negative", gen(image=torch.rand(1, 3, 32, 32), strength=-0.1), ValueError, "strength"),
    # prompts and embeddings
    Case("prompt_none_no_embeds", gen(prompt=None), ValueError, "prompt: provide a prompt"),
    Case("prompt_and_embeds", gen(prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "prompt and prompt_embeds"),
    Case("prompt_bytes", gen(prompt=b"\xff\xfe a cat"), TypeError, "prompt: expected a str"),
    Case("prompt_lone_surrogate", gen(prompt="a cat \udcff"), ValueError, "prompt: not valid Unicode"),
    Case("negative_lone_surrogate", gen(negative_prompt="\udcff"), ValueError, "negative_prompt: not valid Unicode"),
    Case("prompt_empty_list", gen(prompt=[]), TypeError, "prompt"),
    Case("negative_list_length", gen(prompt=["a", "b"], negative_prompt=["x"]), ValueError,
         "negative_prompt: has 1 entries but prompt has 2"),
    Case("negative_type_mismatch", gen(negative_prompt=["x"]), TypeError, "negative_prompt"),
    Case("embeds_wrong_width", gen(prompt=None, prompt_embeds=torch.zeros(1, 77, 7)), ValueError,
         "prompt_embeds: width 7 does not match"),
    Case("embeds_not_3d", gen(prompt=None, prompt_embeds=torch.zeros(77, 32)), ValueError, "prompt_embeds"),
    Case("prompt_empty", gen(prompt=""), None),
    Case("prompt_10000_chars", gen(prompt=("一只戴着帽子的猫 a cat " * 700)[:10_000]), None),
    # random state and latents
    Case("generator_list_length", gen(prompt=["a", "b"], generator=[torch.Generator()]), ValueError,
         "generator: a list of 1 generators"),
    Case("generator_wrong_type", gen(generator=42), TypeError, "generator"),
    Case("seed_list_length", gen(seed=[1, 2]), ValueError, "seed: a list of 2 seeds"),
    Case("seed_and_generator", gen(seed=1, generator=torch.Generator()), ValueError, "seed and generator"),
    Case("latents_wrong_shape", gen(latents=torch.zeros(1, 4, 8, 8)), ValueError, "latents: expected a tensor of shape"),
    Case("latents_int_dtype", gen(latents=torch.zeros(1, 4, 16, 16, dtype=torch.int64)), ValueError,
         "latents: expected a floating-point tensor"),
    Case("latents_nan", gen(latents=torch.full((1, 4, 16, 16), float("nan"))), ValueError, "latents: contains NaN"),
    Case("latents_float64_are_cast", gen(latents=L.double()), None),
    Case("callback_returns_nan_latents", gen(callback_on_step_end=nan_callback), ValueError,
         "callback_on_step_end: returned latents with NaN"),
    # images
    Case("image_2_channels", gen(image=torch.rand(1, 2, 32, 32)), ValueError, "image: expected 3 colour channels"),
    Case("image_5_channels", gen(image=np.random.rand(32, 32, 5)), ValueError, "image: numpy images must be HxWx3"),
    Case("image_list_two_sizes", gen(image=[torch.rand(3, 32, 32), torch.rand(3, 16, 16)]), ValueError,
         "image: a list must hold images of one size"),
    Case("image_empty", gen(image=torch.rand(1, 3, 0, 0)), ValueError, "image: 0x0 is smaller"),
    Case("image_nan", gen(image=torch.full((1, 3, 32, 32), float("nan"))), ValueError, "image: contains NaN"),
    Case("image_path_string", gen(image="photo.png"), TypeError, "image: expected a PIL image"),
    Case("image_100_megapixels", lambda ctx: open_image(ctx.bomb), ValueError, "image: 10000x10000 is larger"),
    Case("image_100_megapixels_pil", gen_lazy(lambda ctx: {"image": PIL.Image.open(ctx.bomb)}), ValueError,
         "image: 10000x10000 is larger"),
    Case("png_16bit", img2img("16bit"), None),
    Case("png_palette_transparency", img2img("palette"), None),
    Case("png_rgba", img2img("rgba"), None),
    Case("png_la", img2img("la"), None),
    Case("image_not_an_image", lambda ctx: open_image(ctx.tmp / "model_index.json"), ValueError,
         "image: .* is not a readable image"),
    # names
    Case("sampler_unknown", gen(sampler="euler_b"), ValueError, "sampler: unknown sampler 'euler_b'"),
    Case("output_type_unknown", gen(output_type="jpeg"), ValueError, "output_type: must be one of"),
    Case("dtype_unknown", lambda ctx: altdiff.load(ctx.folder, device="cpu", dtype="fp8"), ValueError, "dtype: 'fp8'"),
    Case("device_unknown", lambda ctx: altdiff.load(ctx.folder, device="tpu"), ValueError, "device: 'tpu'"),
    Case("cuda_missing", lambda ctx: altdiff.load(ctx.folder, device="cuda"), ValueError, "device: CUDA was requested"),
    Case("pipeline_to_cuda_missing", lambda ctx: ctx.pipe.to("cuda"), ValueError, "device: CUDA was requested"),
    # loader: hostile and broken weights and configs
    Case("weights_zero_length", load_broken(UNET, lambda p: p.write_bytes(b"")), WeightsError, "unet.*truncated"),
    Case("weights_truncated", load_broken(UNET, lambda p: p.write_bytes(p.read_bytes()[:-1000])), WeightsError,
         "unet.*truncated"),
    Case("weights_header_not_json", load_broken(UNET, lambda p: p.write_bytes(safetensors_bytes({})[:8] + b"}{" * 4)),
         WeightsError, "header"),
    Case("weights_header_length_past_end",
         load_broken(UNET, lambda p: p.write_bytes(struct.pack("<Q", 10**12) + b"{}")), WeightsError, "truncated"),
    Case("weights_offsets_past_end", load_broken(UNET, lambda p: p.write_bytes(safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [200], "data_offsets": [0, 800]}}, b"\0" * 8))), WeightsError,
         "tensor data ends at byte"),
    Case("weights_pickle_payload_bin", load_broken("unet", lambda p: (
        (p / "diffusion_pytorch_model.safetensors").unlink(),
        write_payload(p / "diffusion_pytorch_model.bin", "torch"))), WeightsError, "refused to unpickle"),
    Case("weights_pickle_payload_ckpt", lambda ctx: read_state_dict(write_payload(ctx.tmp / "m.ckpt", "torch")),
         WeightsError, "m.ckpt: refused to unpickle"),
    Case("weights_legacy_pickle_payload_pt", lambda ctx: read_state_dict(write_payload(ctx.tmp / "m.pt", "plain")),
         WeightsError, "m.pt"),
    Case("weights_missing_key", load_broken(UNET, edit_state_dict(lambda sd: sd.pop("conv_in.weight"))),
         WeightsError, "missing keys: conv_in.weight"),
    Case("weights_extra_key", load_broken(UNET, edit_state_dict(lambda sd: sd.update(extra=torch.zeros(1)))),
         WeightsError, "unexpected keys: extra"),
    Case("weights_wrong_shape", load_broken(UNET, edit_state_dict(
        lambda sd: sd.update({"conv_in.bias": torch.zeros(3)}))), WeightsError, "shape mismatches: conv_in.bias"),
    Case("config_not_json", load_broken("unet/config.json", lambda p: p.write_text("{not json")), ConfigError,
         "unet/config.json: not a valid JSON config"),
    Case("config_not_utf8", load_broken("vae/config.json", lambda p: p.write_bytes(b'{"a": "\xff"}')), ConfigError,
         "vae/config.json"),
    Case("config_not_an_object", load_broken("unet/config.json", lambda p: p.write_text("[1]")), ConfigError,
         "expected a JSON object"),
    Case("config_unsupported_block", load_broken("unet/config.json", edit_json(
        lambda c: c.update(down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"]))), ConfigError,
         "down_block_types contains 'SimpleCrossAttnDownBlock2D'"),
    Case("config_unsupported_vae_block", load_broken("vae/config.json", edit_json(
        lambda c: c.update(up_block_types=["AttnUpDecoderBlock2D"] * len(c["up_block_types"])))), ConfigError,
         "up_block_types"),
    Case("folder_without_unet", load_broken("unet", shutil.rmtree), ValueError, "has no unet/ folder"),
    Case("tokenizer_garbage", load_broken("tokenizer/sentencepiece.bpe.model", lambda p: p.write_bytes(b"junk")),
         ConfigError, "not a valid sentencepiece model"),
    Case("model_path_missing", lambda ctx: altdiff.load(ctx.tmp / "no" / "such" / "model", device="cpu"), ValueError,
         "model: .*no/such/model"),
    # the command line
    Case("cli_steps_zero", cli_args("a cat", "--steps", "0"), 2, "--steps: must be >= 1"),
    Case("cli_width_not_multiple_of_8", cli_args("a cat", "-W", "12"), 2, "width: must be a positive multiple"),
    Case("cli_bomb_image", cli_args("a cat", "-i", "{bomb}"), 2, "image: 10000x10000 is larger"),
    Case("cli_cuda_missing", cli_args("a cat", "--device", "cuda"), 2, "CUDA was requested"),
    Case("cli_dtype_unknown", cli_args("a cat", "--dtype", "fp8"), 2, "--dtype: invalid choice"),
    Case("cli_prompt_undecodable_bytes", cli_args(os.fsdecode(b"a cat \xff")), 2, "prompt: not valid Unicode"),
    Case("cli_broken_weights", cli_args("a cat", "--model", "{tmp}/model", model=False), 2, "unet.*truncated"),
    Case("cli_16bit_png", cli_args("a cat", "-i", "{png16}"), 0),
    # 1. numbers as numpy and torch scalars (bool stays refused)
    Case("np_float32_guidance", gen(guidance_scale=np.float32(7.5)), None),
    Case("np_int64_steps", gen(num_inference_steps=np.int64(2)), None),
    Case("np_sizes_and_counts", gen(height=np.int64(32), width=np.int32(32), num_images_per_prompt=np.int8(1)),
         None),
    Case("tensor_0d_numbers", gen(guidance_scale=torch.tensor(7.5), eta=torch.tensor(0.5), sampler="ddim",
                                  guidance_rescale=torch.tensor(0.3), num_inference_steps=torch.tensor(2)), None),
    Case("np_strength_and_seed", gen(image=U8, strength=np.float32(0.5), seed=np.uint64(7)), None),
    Case("np_lora_scale", gen(cross_attention_kwargs={"scale": np.float32(0.5)}), None),
    Case("np_clip_skip", gen(clip_skip=np.int64(1)), None),
    Case("bool_guidance", gen(guidance_scale=True), ValueError, "guidance_scale: must be a finite number"),
    Case("np_bool_steps", gen(num_inference_steps=np.bool_(True)), ValueError, "num_inference_steps"),
    Case("tensor_bool_steps", gen(num_inference_steps=torch.tensor(True)), ValueError, "num_inference_steps"),
    Case("np_nan_guidance", gen(guidance_scale=np.float32(NAN)), ValueError, "guidance_scale"),
    Case("tensor_1d_guidance", gen(guidance_scale=torch.tensor([7.5])), ValueError, "guidance_scale"),
    Case("np_float_steps", gen(num_inference_steps=np.float64(2.0)), ValueError, "num_inference_steps"),
    Case("lora_scale_string", gen(cross_attention_kwargs={"scale": "x"}), TypeError,
         r"cross_attention_kwargs\['scale'\]: must be a finite number"),
    Case("cross_attention_kwargs_unknown_key", gen(cross_attention_kwargs={"gligen": 1}), ValueError,
         r"cross_attention_kwargs: unsupported keys \['gligen'\]"),
    Case("cross_attention_kwargs_list", gen(cross_attention_kwargs=[0.5]), TypeError,
         "cross_attention_kwargs: must be a dict"),
    # 2. seeds outside 0..2**64-1
    Case("seed_2_64", gen(seed=2**64), ValueError, r"seed: must be in 0..2\*\*64-1"),
    Case("seed_negative", gen(seed=-1), ValueError, r"seed: must be in 0..2\*\*64-1"),
    Case("seed_list_entry_2_64", gen(prompt=["a", "b"], seed=[1, 2**64]), ValueError, r"seed\[1\]: must be in"),
    Case("seed_float", gen(seed=1.5), TypeError, "seed: expected an int"),
    Case("seed_2_64_minus_1", gen(seed=2**64 - 1), None),
    Case("cli_seed_2_64", cli_args("a cat", "--seed", str(2**64)), 2, r"--seed: must be in 0..2\*\*64-1"),
    Case("cli_seeds_run_past_2_64", cli_args("a cat", "--seed", str(2**64 - 1), "--batch-count", "2"), 2,
         "--seed: .*the 2 seeds from it"),
    Case("cli_seed_2_64_minus_1", cli_args("a cat", "--seed", str(2**64 - 1)), 0),
    # 3. non-finite tensors the user passes in
    Case("prompt_embeds_nan", gen(prompt=None, prompt_embeds=torch.full((1, 77, 32), NAN)), ValueError,
         "prompt_embeds: contains NaN or inf"),
    Case("negative_prompt_embeds_inf", gen(negative_prompt_embeds=torch.full((1, 77, 32), INF)), ValueError,
         "negative_prompt_embeds: contains NaN or inf"),
    Case("negative_prompt_embeds_wrong_width", gen(negative_prompt_embeds=torch.zeros(1, 77, 7)), ValueError,
         "negative_prompt_embeds: width 7 does not match"),
    Case("negative_prompt_embeds_wrong_length", gen(negative_prompt_embeds=torch.zeros(1, 70, 32)), ValueError,
         "negative_prompt_embeds: has 70 tokens"),
    Case("negative_prompt_embeds_wrong_batch", gen(negative_prompt_embeds=torch.zeros(2, 77, 32)), ValueError,
         "negative_prompt_embeds: has 2 entries"),
    Case("prompt_embeds_int", gen(prompt=None, prompt_embeds=torch.zeros(1, 77, 32, dtype=torch.int64)),
         ValueError, "prompt_embeds: expected a floating-point tensor"),
    Case("latents_inf", gen(latents=torch.full((1, 4, 16, 16), INF)), ValueError, "latents: contains NaN or inf"),
    Case("image_latents_nan", gen(image=torch.full((1, 4, 16, 16), NAN)), ValueError, "image: contains NaN"),
    Case("lora_nan_weights", lambda ctx: ctx.pipe.load_lora_weights(lora_file(ctx.tmp / "nan.safetensors", NAN)),
         altdiff.weights.WeightsError, r"nan.safetensors: NaN or inf in the LoRA weights of unet\.down_blocks"),
    Case("lora_inf_alpha", lambda ctx: ctx.pipe.load_lora_weights(lora_file(ctx.tmp / "inf.safetensors", alpha=INF)),
         altdiff.weights.WeightsError, "inf.safetensors: NaN or inf"),
    Case("embedding_nan", lambda ctx: ctx.pipe.load_textual_inversion(embedding_file(ctx.tmp / "nan.pt", NAN)),
         altdiff.weights.WeightsError, "nan.pt: the embedding contains NaN or inf"),
    # 4. image arrays: uint8 is 0..255, floats must be in [0, 1] or [-1, 1]; other devices
    Case("image_uint8_array", gen(image=U8, strength=0.5), None),
    Case("image_uint8_tensor", gen(image=torch.from_numpy(U8).permute(2, 0, 1), strength=0.5), None),
    Case("image_tensor_minus1_to_1", gen(image=torch.rand(1, 3, 32, 32) * 2 - 1, strength=0.5), None),
    Case("image_float_array_0_255", gen(image=U8.astype(np.float32), strength=0.5), ValueError,
         r"image: float pixels must be in \[0, 1\] or \[-1, 1\] \(uint8: 0..255\)"),
    Case("image_float_tensor_0_255", gen(image=torch.from_numpy(U8).permute(2, 0, 1).float(), strength=0.5),
         ValueError, r"image: float pixels must be in \[0, 1\] or \[-1, 1\]"),
    Case("image_below_minus_1", gen(image=torch.rand(1, 3, 32, 32) * 2 - 1.5, strength=0.5), ValueError,
         r"image: float pixels must be in"),
    Case("image_int64_array", gen(image=U8.astype(np.int64), strength=0.5), TypeError,
         "image: expected uint8 .* got numpy int64"),
    Case("image_bool_tensor", gen(image=torch.ones(1, 3, 32, 32, dtype=torch.bool), strength=0.5), TypeError,
         "image: expected uint8"),
    Case("image_string_array", gen(image=np.full((32, 32, 3), "x"), strength=0.5), TypeError, "image: expected uint8"),
    Case("image_inf_array", gen(image=np.full((32, 32, 3), INF, dtype=np.float32), strength=0.5), ValueError,
         "image: contains NaN or inf"),
    Case("image_meta_tensor", gen(image=torch.zeros(1, 3, 32, 32, device=META)), ValueError,
         "image: the tensor is on the meta device"),
    Case("latents_meta_tensor", gen(latents=torch.zeros(1, 4, 16, 16, device=META)), ValueError,
         "latents: the tensor is on the meta device"),
    Case("prompt_embeds_meta_tensor", gen(prompt=None, prompt_embeds=torch.zeros(1, 77, 32, device=META)),
         ValueError, "prompt_embeds: the tensor is on the meta device"),
    # 5. config files with wrong types or values; integer weights
    Case("config_string_for_int", config_edit("unet/config.json", in_channels="4"), ConfigError,
         "unet/config.json: in_channels='4' has the wrong type"),
    Case("config_bool_for_int", config_edit("vae/config.json", latent_channels=True), ConfigError,
         "vae/config.json: latent_channels=True has the wrong type"),
    Case("config_nan_float", config_edit("vae/config.json", scaling_factor=NAN), ConfigError,
         "vae/config.json: scaling_factor=nan"),
    Case("config_zero_groups", config_edit("vae/config.json", norm_num_groups=0), ConfigError,
         "vae/config.json: norm_num_groups=0"),
    Case("config_negative_channels", config_edit("unet/config.json", block_out_channels=[32, -64]), ConfigError,
         r"unet/config.json: block_out_channels=\[32, -64\]"),
    Case("config_groups_do_not_divide", config_edit("unet/config.json", norm_num_groups=5), ConfigError,
         "unet/config.json: norm_num_groups=5 .* a divisor"),
    Case("config_per_block_list_length", config_edit("unet/config.json", layers_per_block=[1]), ConfigError,
         r"unet/config.json: layers_per_block=\[1\]"),
    Case("config_unknown_activation", config_edit("text_encoder/config.json", hidden_act="swish"), ConfigError,
         "text_encoder/config.json: hidden_act='swish'"),
    Case("config_unknown_vae_activation", config_edit("vae/config.json", act_fn="mish"), ConfigError,
         "vae/config.json: act_fn='mish'"),
    Case("config_vae_shift_factor", config_edit("vae/config.json", shift_factor=0.1159), ConfigError,
         "vae/config.json: shift_factor=0.1159"),
    Case("config_scheduler_string", load_broken("scheduler/scheduler_config.json", edit_json(
        lambda c: c.update(num_train_timesteps="1000"))), ConfigError,
         "scheduler_config.json: num_train_timesteps='1000' has the wrong type"),
    Case("config_safety_checker_string", load_broken("safety_checker/config.json", edit_json(
        lambda c: c["vision_config"].update(hidden_size="32"))), ConfigError,
         "safety_checker/config.json: hidden_size='32' has the wrong type"),
    Case("weights_integer_dtype", load_broken(UNET, edit_state_dict(
        lambda sd: sd.update({"conv_in.weight": sd["conv_in.weight"].to(torch.int8)}))), WeightsError,
         "unet/diffusion_pytorch_model.safetensors: .*non-floating-point dtype: conv_in.weight torch.int8"),
    # 6. output paths, checked before any work
    Case("cli_output_under_a_file", cli_args("a cat", output="{tmp}/model_index.json/img.png"), 2,
         "-o/--output: cannot write to .*model_index.json is a file, not a folder"),
    Case("cli_output_checked_before_loading", cli_args("a cat", "--model", "{tmp}/no-such-model", model=False,
                                                         output="{tmp}/model_index.json/img.png"), 2,
         "-o/--output: cannot write to"),
    Case("cli_output_is_a_folder", cli_args("a cat", "--overwrite", output="{tmp}"), 2,
         "output: .* is a folder"),
    # 7. altdiff batch
    Case("batch_out_under_a_file", batch_args("--out", "{tmp}/model_index.json/out"), 2,
         "--out: cannot write to .*model_index.json is a file"),
    Case("batch_cuda_missing", batch_args("--out", "{out}", "--device", "cuda"), 2, "CUDA was requested"),
    Case("batch_num_gpus_negative", batch_args("--out", "{out}", "--num-gpus-per-worker", "-1"), 2,
         "--num-gpus-per-worker: must be >= 0"),
]
CONVERTER = [
    Case("convert_src_missing", convert_args(lambda ctx: [str(ctx.tmp / "none.ckpt"), str(ctx.out)]), 1, "none.ckpt"),
    Case("convert_pickle_payload", convert_args(lambda ctx: [
        str(write_payload(ctx.tmp / "evil.ckpt", "torch")), str(ctx.out)]), 1, "evil.ckpt"),
    Case("convert_zero_length", convert_args(lambda ctx: [str(empty(ctx.tmp / "e.safetensors")), str(ctx.out)]), 1,
         "e.safetensors"),
]
CASES += CONVERTER
# Counted exactly, so a case cannot vanish unnoticed: 84 (81 + the converter cases) before issue 16 added its classes.
CORPUS_SIZE = 151


def test_corpus_size_is_exact_and_ids_distinct():
    assert len(CASES) == CORPUS_SIZE and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_corpus(case, pipe, inputs, m9_folder, tmp_path):
    ctx = SimpleNamespace(pipe=pipe, folder=m9_folder, tmp=tmp_path, out=tmp_path / "out", pngs=inputs.pngs,
                          bomb=inputs.bomb)
    (tmp_path / "model_index.json").write_text("{}")
    if case.id == "cli_broken_weights":
        broken_model(ctx, UNET, lambda p: p.write_bytes(p.read_bytes()[:100]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(case.expect, type):
            with pytest.raises(case.expect, match=case.match) as info:
                case.run(ctx)
            # Raised at altdiff's boundary, not from deep inside torch, safetensors or Pillow.
            origin = traceback.extract_tb(info.value.__traceback__)[-1].filename
            assert "/altdiff/" in origin or "/weights_convert/" in origin, origin
        elif isinstance(case.expect, int):
            rc, err = case.run(ctx)
            assert rc == case.expect, err
            assert re.search(case.match, err) and "Traceback" not in err, err
        else:
            result = case.run(ctx)
            assert np.isfinite(result.images).all()
    assert not (tmp_path / "PWNED").exists()  # no pickle payload ran
    written = sorted(p.name for p in ctx.out.rglob("*")) if ctx.out.exists() else []
    assert written == (["img.png"] if case.expect == 0 else []), written
    assert not list(tmp_path.rglob("*.tmp"))
    assert np.array_equal(probe(pipe), inputs.probe)  # the pipeline is unchanged and usable


# --- numbers given as numpy and torch scalars, image arrays: the same image as plain numbers and PIL ---------

def test_numpy_and_tensor_scalars_give_the_images_of_plain_numbers(pipe):
    def make(**kwargs):
        return pipe.generate(PROMPT, output_type="np", progress=False, sampler="ddim", **kwargs).images
    plain = make(num_inference_steps=3, guidance_scale=6.0, eta=0.5, seed=5, guidance_rescale=0.5)
    assert np.abs(plain - make(num_inference_steps=3, guidance_scale=9.0, eta=0.5, seed=5,
                               guidance_rescale=0.5)).max() > 0.05  # guidance reaches the image
    for numbers in ({"num_inference_steps": np.int64(3), "guidance_scale": np.float32(6.0), "eta": np.float64(0.5),
                     "seed": np.uint64(5), "guidance_rescale": np.float16(0.5)},
                    {"num_inference_steps": torch.tensor(3), "guidance_scale": torch.tensor(6.0),
                     "eta": torch.tensor(0.5), "seed": torch.tensor(5), "guidance_rescale": torch.tensor(0.5)}):
        assert np.array_equal(make(**numbers), plain)


def test_a_uint8_array_is_the_same_picture_as_pil(pipe):
    def img2img(image):
        return pipe.generate(PROMPT, image=image, strength=0.6, num_inference_steps=4, seed=3, output_type="np",
                             progress=False).images
    from_pil = img2img(PIL.Image.fromarray(U8))
    assert np.array_equal(img2img(U8), from_pil)
    # A CHW tensor reaches the VAE's convolutions in another memory layout than HWC arrays: rounding only.
    assert np.abs(img2img(torch.from_numpy(U8).permute(2, 0, 1)) - from_pil).max() < 1e-4
    assert np.array_equal(img2img(U8.astype(np.float32) / 255), from_pil)  # diffusers' [0, 1] float arrays
    assert np.abs(img2img(255 - U8) - from_pil).max() > 0.02  # the init image reaches the output (5+ levels)


def test_switches_take_numpy_and_tensor_scalars(m9_folder):
    pipe = altdiff.load(m9_folder, device="cpu", safety_checker=False)
    pipe.enable_freeu(np.float32(0.9), torch.tensor(0.2), np.float64(1.2), 1.4)
    assert pipe.unet.freeu == {"s1": float(np.float32(0.9)), "s2": float(torch.tensor(0.2)), "b1": 1.2, "b2": 1.4}
    assert all(type(v) is float for v in pipe.unet.freeu.values())
    with pytest.raises(TypeError, match="enable_freeu: s1 must be a finite number"):
        pipe.enable_freeu(np.float32("nan"), 0.2, 1.2, 1.4)
    pipe.vae.enable_tiling(np.int64(32), torch.tensor(16), np.float32(0.25))
    assert (type(pipe.vae.tile_sample_min_size), type(pipe.vae.tile_latent_min_size)) == (int, int)
    with pytest.raises(ValueError, match="tile_sample_min_size must be a positive int"):
        pipe.vae.enable_tiling(np.float64(32.0))


# --- output paths and files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_are_created_with_the_umask(tmp_path, umask):
    from altdiff.atomic import atomic_path
    from altdiff.images import save_png

    old = os.umask(umask)
    try:
        save_png(PIL.Image.new("RGB", (8, 8)), tmp_path / "a.png")
        with atomic_path(tmp_path / "manifest.jsonl") as tmp:
            tmp.write_text("{}\n")
    finally:
        os.umask(old)
    for name in ("a.png", "manifest.jsonl"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "manifest.jsonl"]


def test_an_unwritable_output_folder_is_refused_before_loading(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            # root ignores mode bits; stand in for the kernel's answer a normal user gets.
            real_access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == locked else
                                real_access(p, mode, **k))
        # A model that does not exist: the output error comes first, so nothing was loaded.
        rc, err = run_cli(cli.main, ["a cat", "--model", str(tmp_path / "missing"), "-o", str(locked / "sub/x.png")])
        assert rc == 2 and f"-o/--output: cannot write to {locked / 'sub'}: no permission to create files in " \
            f"{locked}" in err and "Traceback" not in err
        requests = tmp_path / "r.jsonl"
        requests.write_text('{"prompt": "x"}\n')
        rc, err = run_cli(cli.batch_main, [str(requests), "--out", str(locked / "out"), "--device", "cpu"])
        assert rc == 2 and "--out: cannot write to" in err and "Traceback" not in err
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_a_failed_write_is_one_error_line(m9_folder, tmp_path, monkeypatch):
    def disk_full(self, fp, *args, **kwargs):
        raise OSError(28, "No space left on device", str(fp))
    monkeypatch.setattr(PIL.Image.Image, "save", disk_full)
    out = tmp_path / "out"
    rc, err = run_cli(cli.main, ["a cat", "--model", str(m9_folder), "--steps", "1", "--quiet", "-o",
                                 str(out / "img.png")])
    assert rc == 1 and "Traceback" not in err
    assert re.fullmatch(r"altdiff: error: \S+/out/img\.png: No space left on device\n", err), err
    assert list(out.iterdir()) == []  # no image, no temp file
    # altdiff batch: a request whose image cannot be written fails alone, with the reason in the manifest.
    requests = tmp_path / "r.jsonl"
    requests.write_text('{"prompt": "x", "num_inference_steps": 1}\n')
    rc, err = run_cli(cli.batch_main, [str(requests), "--out", str(out), "--model", str(m9_folder), "--device", "cpu",
                                   "--quiet"])
    manifest = [json.loads(line) for line in (out / batch.MANIFEST).read_text().splitlines()]
    assert rc == 1 and "Traceback" not in err and "No space left on device" in manifest[0]["error"]
    assert sorted(p.name for p in out.iterdir()) == [batch.MANIFEST]


# --- fp16 VAE overflow, end to end -----------------------------------------------------------------------------

def test_fp16_decode_overflow_retries_in_fp32_with_a_warning(m9_folder, monkeypatch):
    pipe = altdiff.load(m9_folder, device="cpu", dtype="fp16", safety_checker=None)
    clean = pipe.generate(PROMPT, num_inference_steps=2, seed=0, output_type="np", progress=False).images
    conv_out = pipe.vae.decoder.conv_out
    forward = conv_out.forward

    def overflow_in_half(x):  # stand-in for an activation overflow that only float16 hits
        y = forward(x)
        return torch.full_like(y, float("inf")) if y.dtype == torch.float16 else y
    monkeypatch.setattr(conv_out, "forward", overflow_in_half)
    with pytest.warns(RuntimeWarning, match="decoding again in float32"):
        res = pipe.generate(PROMPT, num_inference_steps=2, seed=0, output_type="np", progress=False)
    assert np.isfinite(res.images).all()
    assert np.abs(res.images - clean).max() < 0.02  # the fp32 decode of the same latents
    assert pipe.vae.dtype == torch.float16


# --- threads -----------------------------------------------------------------------------------------------------

def test_threads_sharing_a_pipeline_give_the_sequential_images(pipe):
    prompts = ["a cat wearing a hat", "一只戴着帽子的猫", "кошка в шляпе", "beautiful landscape"]

    def make(i: int) -> np.ndarray:
        return pipe.generate(prompts[i], num_inference_steps=3, generator=torch.Generator().manual_seed(i),
                             output_type="np", progress=False).images
    sequential = [make(i) for i in range(len(prompts))]
    assert np.abs(sequential[0] - sequential[1]).max() > 0.1  # different requests, different images
    results = [None] * len(prompts)

    def worker(i: int) -> None:
        results[i] = make(i)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, sequential):
        assert np.array_equal(got, want)


class WatchedLock:
    """A lock that tells when a caller had to wait for it."""

    def __init__(self):
        self.inner, self.blocked = threading.Lock(), threading.Event()

    def __enter__(self):
        if not self.inner.acquire(blocking=False):
            self.blocked.set()
            self.inner.acquire()
        return self

    def __exit__(self, *exc):
        self.inner.release()


@pytest.mark.parametrize("call", [probe, lambda p: p.encode_prompt("a cat", p.device, 1, True)],
                         ids=["generate", "encode_prompt"])
def test_generate_and_encode_prompt_wait_for_the_pipeline_lock(pipe, monkeypatch, call):
    lock = WatchedLock()
    monkeypatch.setattr(pipe, "lock", lock)
    done = threading.Event()
    with lock.inner:
        t = threading.Thread(target=lambda: (call(pipe), done.set()))
        t.start()
        assert lock.blocked.wait(60)  # the call reached the lock and waits at it
        assert not done.is_set()
    t.join()
    assert done.is_set()


# --- tokenizer properties -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(m9_folder):
    return Tokenizer.from_folder(m9_folder / "tokenizer")


# Characters of the tiny vocabulary that NFKC leaves alone and that are not combining marks.
PLAIN = sorted(c for c in set(tiny.CORPUS) if c.strip() and unicodedata.normalize("NFKC", c) == c
               and not unicodedata.category(c).startswith("M"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_any_text_encodes_to_at_most_77_ids_and_decodes_to_a_fixed_point(tokenizer, text):
    ids = tokenizer(text, padding="max_length")["input_ids"][0].tolist()
    assert len(ids) == 77 and ids[0] == 0 and 2 in ids
    assert len(tokenizer(text)["input_ids"][0]) <= 77
    normal = tokenizer.decode(ids)
    again = tokenizer.decode(tokenizer(normal, padding="max_length")["input_ids"][0].tolist())
    # Dropped <unk> pieces can leave two spaces side by side (as transformers' decode does); sentencepiece
    # collapses them on the next encode, so the fixed point holds up to runs of whitespace.
    assert " ".join(again.split()) == " ".join(normal.split())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.text(st.sampled_from(PLAIN), min_size=1, max_size=6), max_size=5),
       spaces=st.sampled_from([" ", "  ", "\t", "\u3000", " \n "]))
def test_vocabulary_text_decodes_to_its_normalized_form(tokenizer, words, spaces):
    text = spaces + spaces.join(words)
    ids = tokenizer(text, padding="max_length")["input_ids"][0].tolist()
    assert tokenizer.decode(ids) == " ".join(words)


def test_the_pickle_payload_is_live(tmp_path):
    # Proves the corpus' pickle cases mean something: unpickled naively, the payload does run.
    path = write_payload(tmp_path / "m.pt", "plain")
    pickle.loads(path.read_bytes())
    assert (tmp_path / "PWNED").exists()


def test_concurrent_generate_with_a_model_string_loads_it_once(m9_folder, monkeypatch):
    """Two threads naming one model (by two spellings of its path) share one load; the cache is bounded."""
    generate_module = importlib.import_module("altdiff.pipeline")  # home of the generate(model="...") cache

    real, loads = generate_module.load, []

    def slow_load(source, **kwargs):
        loads.append(source)
        time.sleep(0.3)  # both threads are inside get_model before the first load ends
        return real(source, device="cpu", safety_checker=False)
    monkeypatch.setattr(generate_module, "load", slow_load)
    monkeypatch.setattr(generate_module, "_loaded", type(generate_module._loaded)())
    spellings = [str(m9_folder), str(m9_folder) + "/"]
    with ThreadPoolExecutor(2) as pool:
        pipes = list(pool.map(generate_module.get_model, spellings))
    assert len(loads) == 1 and pipes[0] is pipes[1]
    for k in range(generate_module.MAX_LOADED + 1):  # hub-like ids: never looked up, the fake load counts
        monkeypatch.setattr(generate_module, "load", lambda source, **kw: object())
        generate_module.get_model(f"org/model-{k}")
    assert len(generate_module._loaded) == generate_module.MAX_LOADED


def test_loader_threads_get_the_callers_current_gpu(m9_folder, monkeypatch):
    """load(device="cuda") reads its components in threads, whose own current GPU is GPU 0: each reader must
    be given the caller's current GPU explicitly (d931901). Run on the CPU with the readers recording what
    they are given (test_cuda.py loads on a second GPU when there is one)."""
    from altdiff import pipeline

    given = []
    for name in ("load_unet", "load_text_encoder", "load_vae"):
        real = getattr(pipeline, name)

        def reader(folder, dtype, device, variant, real=real):
            given.append(device)
            return real(folder, dtype=dtype, device="cpu", variant=variant)
        monkeypatch.setattr(pipeline, name, reader)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    pipeline._load(m9_folder, torch.device("cuda"), torch.float32, None, False, None, None)
    assert given == [torch.device("cuda", 1)] * 3


def test_a_bad_argument_fails_before_a_model_string_loads(monkeypatch):
    """altdiff.generate(model="source") checks the other arguments first: a typo costs no model load."""
    from altdiff import pipeline

    loads = []
    monkeypatch.setattr(pipeline, "load", lambda source, **kwargs: loads.append(source))
    with pytest.raises(ValueError, match="num_inference_steps"):
        altdiff.generate("a cat", model="org/never-loaded", num_inference_steps=0)
    with pytest.raises(ValueError, match="guidance_rescale"):
        altdiff.generate("a cat", guidance_rescale=-1.0)  # nor the default hub model
    with pytest.raises(TypeError, match="model: expected an altdiff.Pipeline or a source string, got int"):
        altdiff.generate("a cat", model=3)
    for bad, match in [(dict(sampler="eulerr"), "sampler: unknown sampler 'eulerr'"),
                       (dict(mask_image=PIL.Image.new("L", (8, 8))), "mask_image: inpainting needs `image`"),
                       (dict(family="diffusers", hires={"scale": 2}), "hires: .* the webui family's")]:
        with pytest.raises(ValueError, match=match):
            altdiff.generate("a cat", **bad)  # the diffusers family's own refusals
    assert loads == []
