"""The webui's prompt syntax for adapters: `<lora:NAME:w>` tags resolved in a LoRA folder for one call, and
embeddings found by file name in an embeddings folder, with the "Lora hashes" / "TI hashes" infotext fields.

The oracle for a tag is altdiff's explicit `load_lora_weights` at that weight (itself checked against
diffusers/PEFT and lycoris-lora in test_adapters.py / test_lycoris.py); the hashes are computed here with
hashlib from the rules in the webui's modules/hashes.py and network.py.
"""

import hashlib
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

import altdiff
from altdiff import lora, networks
from altdiff.infotext import parse_infotext

PROMPT = "一只戴着帽子的猫"
STEPS = 3


def gen():
    return torch.Generator().manual_seed(0)


def levels(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max() * 255)


def run(pipe, prompt=PROMPT, **kwargs):
    return pipe.generate(prompt, generator=gen(), num_inference_steps=STEPS, output_type="np", progress=False,
                         **kwargs).images


def kohya_lora(pipe, path, seed, metadata=None):
    """A kohya-named LoRA with random weights on the attention layers of both models."""
    torch.manual_seed(seed)
    tensors = {}
    for model, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for name, module in getattr(pipe, model).named_modules():
            if name.endswith(("attn2.to_v", "attn2.to_out.0", "attention.self.value", "transformation")):
                key = prefix + name.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features) * 0.3
                tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4) * 0.3
                tensors[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def pipe(m9_folder):
    return altdiff.load(m9_folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def lora_dir(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    (root / "styles").mkdir()
    kohya_lora(pipe, root / "styles" / "hat_style.safetensors", seed=1)
    kohya_lora(pipe, root / "other.safetensors", seed=2, metadata={"ss_output_name": "other-alias"})
    return root


@pytest.fixture(scope="module")
def plain(pipe):
    return run(pipe)


def explicit(m9_folder, path, weight, prompt=PROMPT):
    pipe = altdiff.load(m9_folder, device="cpu", dtype=torch.float32)
    pipe.load_lora_weights(path, weight=weight)
    return run(pipe, prompt, a1111_prompts=True)


def test_tag_equals_explicit_loading_for_one_call(pipe, m9_folder, lora_dir, plain):
    tagged = pipe.generate(f"{PROMPT} <lora:hat_style:0.8>", generator=gen(), num_inference_steps=STEPS,
                           output_type="np", progress=False, a1111_prompts=True, lora_dir=lora_dir)
    expected = explicit(m9_folder, lora_dir / "styles" / "hat_style.safetensors", 0.8, PROMPT + " ")
    assert np.array_equal(tagged.images, expected)
    assert levels(tagged.images, plain) > 30  # the adapter moves the image
    # The next call without the tag is the plain model again.
    assert np.array_equal(run(pipe, a1111_prompts=True, lora_dir=lora_dir), plain)
    assert pipe.lora.weights == {}
    # `lyco` is the same tag; the text around the tag is kept as it is.
    lyco = run(pipe, f"{PROMPT} <lyco:hat_style:0.8>", a1111_prompts=True, lora_dir=lora_dir)
    assert np.array_equal(lyco, expected)


def test_te_and_unet_multipliers(pipe, m9_folder, lora_dir):
    path = lora_dir / "styles" / "hat_style.safetensors"
    split = run(pipe, f"<lora:hat_style:te=0.2:unet=0.9>{PROMPT}", a1111_prompts=True, lora_dir=lora_dir)
    ref = altdiff.load(m9_folder, device="cpu", dtype=torch.float32)
    ref.load_lora_weights(path, adapter_name="a", weight={"text_encoder": 0.2, "unet": 0.9})
    assert np.array_equal(split, run(ref, a1111_prompts=True))
    positional = run(pipe, f"<lora:hat_style:0.2:0.9>{PROMPT}", a1111_prompts=True, lora_dir=lora_dir)
    assert np.array_equal(positional, split)
    ref.set_adapters("a", 0.9)
    assert levels(split, run(ref, a1111_prompts=True)) > 5  # the text encoder's multiplier matters


def test_two_tags_alias_and_cache(m9_folder, lora_dir, monkeypatch):
    pipe = altdiff.load(m9_folder, device="cpu", dtype=torch.float32)
    reads = []
    read_lora = lora.read_lora
    monkeypatch.setattr(lora, "read_lora", lambda *a, **k: reads.append(a[1].name) or read_lora(*a, **k))
    prompt = f"{PROMPT} <lora:hat_style:0.5> <lora:other-alias:0.7>"  # other.safetensors by its ss_output_name
    first = run(pipe, prompt, a1111_prompts=True, lora_dir=lora_dir)
    assert sorted(reads) == ["hat_style.safetensors", "other.safetensors"]
    ref = altdiff.load(m9_folder, device="cpu", dtype=torch.float32)
    ref.load_lora_weights(lora_dir / "styles" / "hat_style.safetensors", weight=0.5)
    ref.load_lora_weights(lora_dir / "other.safetensors", weight=0.7)
    assert np.array_equal(first, run(ref, PROMPT + "  ", a1111_prompts=True))
    reads.clear()
    assert np.array_equal(run(pipe, prompt, a1111_prompts=True, lora_dir=lora_dir), first)
    assert reads == []  # unchanged files are not read again
    other = lora_dir / "other.safetensors"
    os.utime(other, ns=(other.stat().st_atime_ns, other.stat().st_mtime_ns + 10**9))
    run(pipe, prompt, a1111_prompts=True, lora_dir=lora_dir)
    assert reads == ["other.safetensors"]  # a changed file is


def test_tag_errors_leave_nothing_active(pipe, lora_dir, plain):
    def call(prompt, **kwargs):
        return pipe.generate(prompt, num_inference_steps=1, output_type="latent", progress=False,
                             a1111_prompts=True, **{"lora_dir": lora_dir, **kwargs})
    with pytest.raises(ValueError, match=rf"<lora:nope>: no file named nope .* in {lora_dir} or its subfolders"):
        call("a <lora:hat_style:1> <lora:nope:1>")
    with pytest.raises(ValueError, match="needs lora_dir"):
        call("a <lora:hat_style:1>", lora_dir=None)
    with pytest.raises(ValueError, match="multiplier 'x' is not a number"):
        call("a <lora:hat_style:x>")
    with pytest.raises(ValueError, match="DyLoRA"):
        call("a <lora:hat_style:1:1:8>")
    with pytest.raises(ValueError, match="hypernetworks are not supported"):
        call("a <hypernet:x:1>")
    with pytest.raises(ValueError, match="same <lora:…> tags"):
        call(["a <lora:hat_style:1>", "b"])
    with pytest.raises(ValueError, match="lora_dir: .* is not a folder"):
        call("a <lora:hat_style:1>", lora_dir=lora_dir / "missing")
    assert pipe.lora is None or pipe.lora.weights == {}
    assert np.array_equal(run(pipe), plain)
    # Without a1111_prompts a tag is plain text, as before.
    assert levels(run(pipe, PROMPT + " <lora:nope:1>"), plain) > 0


def test_lora_hashes_follow_the_webui_rule(pipe, lora_dir, tmp_path):
    def addnet(path):  # modules/hashes.py addnet_hash_safetensors: sha256 of what follows the header
        data = path.read_bytes()
        return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    hat = lora_dir / "styles" / "hat_style.safetensors"
    result = pipe.generate("a <lora:hat_style:1> <lora:other-alias:0.5>", num_inference_steps=1,
                           output_type="latent", progress=False, a1111_prompts=True, lora_dir=lora_dir)
    assert result.infotext == {"Lora hashes": f"hat_style: {addnet(hat)[:12]}, "
                                              f"other-alias: {addnet(lora_dir / 'other.safetensors')[:12]}"}
    assert addnet(hat)[:12] != hashlib.sha256(hat.read_bytes()).hexdigest()[:12]
    # kohya / LyCORIS write the hash into the metadata, and the webui takes it from there; other files: sha256.
    save_file({"x": torch.zeros(1)}, str(tmp_path / "m.safetensors"), metadata={"sshs_model_hash": "0x1234abcd5678ef"})
    assert networks.lora_hash(tmp_path / "m.safetensors") == "0x1234abcd56"
    torch.save({"x": torch.zeros(1)}, tmp_path / "p.pt")
    assert networks.lora_hash(tmp_path / "p.pt") == hashlib.sha256((tmp_path / "p.pt").read_bytes()).hexdigest()[:12]
    assert networks.hashes_field({"a:b,c": hat}, lambda p: "h") == "abc: h"  # ':' and ',' leave names


def _embedding(path, vectors, name="unused-name"):
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name}, path)
    return path


def test_embeddings_dir_by_file_stem(pipe, m9_folder, tmp_path, plain):
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    torch.manual_seed(3)
    hatcat = _embedding(folder / "sub" / "hatcat.pt", torch.randn(2, 32) * 3)
    _embedding(folder / "unused.pt", torch.randn(1, 32) * 3)
    vocab, rows = len(pipe.tokenizer), pipe.text_encoder.roberta.embeddings.word_embeddings.weight
    result = pipe.generate("a hatcat on the moon", negative_prompt="blurry", generator=gen(),
                           num_inference_steps=STEPS, output_type="np", progress=False, embeddings_dir=folder)
    ref = altdiff.load(m9_folder, device="cpu", dtype=torch.float32)
    ref.load_textual_inversion(hatcat, token="hatcat")  # the webui names it by its file, not its "name"
    expected = run(ref, "a hatcat on the moon", negative_prompt="blurry")
    assert np.array_equal(result.images, expected)
    assert levels(expected, run(ref, "a on the moon", negative_prompt="blurry")) > 5
    assert result.infotext == {"TI hashes": f"hatcat: {hashlib.sha256(hatcat.read_bytes()).hexdigest()[:12]}"}
    # Taken off after the call; a negative prompt uses embeddings too; a word inside another is not a name.
    assert len(pipe.tokenizer) == vocab and pipe.text_encoder.roberta.embeddings.word_embeddings.weight is rows
    negative = pipe.generate("a cat", negative_prompt="hatcat", num_inference_steps=1, output_type="latent",
                             progress=False, embeddings_dir=folder)
    assert negative.infotext["TI hashes"].startswith("hatcat: ")
    assert pipe.generate("hatcats", num_inference_steps=1, output_type="latent", progress=False,
                         embeddings_dir=folder).infotext == {}
    with pytest.raises(ValueError, match="embeddings_dir: .* is not a folder"):
        pipe.generate("a", num_inference_steps=1, progress=False, embeddings_dir=tmp_path / "none")
    assert np.array_equal(run(pipe), plain)


def test_cli_lora_embedding_and_tags_in_infotext(m9_folder, lora_dir, tmp_path):
    from altdiff import cli
    from altdiff.images import read_infotext

    emb = _embedding(tmp_path / "hatcat.pt", torch.randn(1, 32))
    out = tmp_path / "o.png"
    hat = lora_dir / "styles" / "hat_style.safetensors"
    assert cli.main(["a hatcat <lora:other:0.5>", "--steps", "1", "--model", str(m9_folder), "--device", "cpu",
                     "--lora", f"{hat}:0.7", "--embedding", str(emb), "--lora-dir", str(lora_dir),
                     "--a1111-prompts", "-o", str(out), "--quiet"]) == 0
    _, _, params = parse_infotext(read_infotext(out))
    assert params["Lora hashes"] == f"hat_style: {networks.lora_hash(hat)}, other: " \
                                    f"{networks.lora_hash(lora_dir / 'other.safetensors')}"
    assert params["TI hashes"] == f"hatcat: {hashlib.sha256(emb.read_bytes()).hexdigest()[:12]}"
    assert cli.lora_option("C:\\x.safetensors") == (cli.Path("C:\\x.safetensors"), 1.0)
    assert cli.lora_option("x.safetensors:0.25") == (cli.Path("x.safetensors"), 0.25)
    assert cli.main(["a", "--lora", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "n.png")]) == 2


def test_batch_resolves_tags_per_request(m9_folder, lora_dir, tmp_path):
    from altdiff import batch
    from altdiff.images import read_infotext

    requests = tmp_path / "requests.jsonl"
    lines = [{"prompt": f"{PROMPT} <lora:hat_style:0.8>", "a1111_prompts": True, "seed": 5,
              "num_inference_steps": STEPS},
             {"prompt": PROMPT, "a1111_prompts": True, "seed": 5, "num_inference_steps": STEPS}]
    requests.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    entries = batch.run(requests, tmp_path / "out", model=str(m9_folder), device="cpu", lora_dir=lora_dir,
                        batch_size=2)
    assert [e["error"] for e in entries] == [None, None]
    pipe = altdiff.load(m9_folder, device="cpu")
    for entry, tagged in zip(entries, (True, False)):
        png = tmp_path / "out" / entry["files"][0]
        _, _, params = parse_infotext(read_infotext(png))
        assert ("Lora hashes" in params) == tagged
        expected = pipe.generate(entry["request"]["prompt"], seed=5, num_inference_steps=STEPS,
                                 a1111_prompts=True, lora_dir=lora_dir, progress=False).images[0]
        assert levels(np.asarray(expected) / 255, np.asarray(PIL.Image.open(png)) / 255) <= 1
