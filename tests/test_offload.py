"""Offload (altdiff.offload) on the CPU: the execution device is a parameter, so on the CPU every load is a
real copy of the CPU tensor, and the tests can see from each parameter's storage whether it is the resting
CPU tensor or a loaded copy. Checked: which component / module is loaded at each stage, that no computation
ever reads a resting tensor (a dispatch mode watches every operator), that everything goes back, and that the
images are bit-identical to a pipeline without offload. The GPU run is in test_cuda.py."""

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import altdiff
from altdiff import offload
from altdiff.cli import build_parser
from altdiff.pipeline import Later
from altdiff.weights import WeightsError

PROMPT = "一只戴着帽子的猫"
GEN = dict(num_inference_steps=3, output_type="np", progress=False, seed=0, negative_prompt="blurry")
COMPONENTS = ("text_encoder", "unet", "vae", "safety_checker")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def plain(m9_folder):
    return altdiff.load(m9_folder, device="cpu")


def offloaded(folder, mode):
    pipe = altdiff.load(folder, device="cpu")
    offload.enable(pipe, mode, CPU)
    return pipe


def resting(pipe) -> dict:
    """Each parameter's resting (CPU tensor) storage, taken while nothing is loaded."""
    return {p: p.untyped_storage().data_ptr() for name in COMPONENTS for p in getattr(pipe, name).parameters()}


def loaded(pipe, rest) -> set[str]:
    """The components whose every parameter is a loaded copy; a component partly loaded is an error."""
    out = set()
    for name in COMPONENTS:
        copies = [p.untyped_storage().data_ptr() != rest[p] for p in getattr(pipe, name).parameters()]
        assert all(copies) or not any(copies), f"{name} partly loaded"
        if all(copies):
            out.add(name)
    return out


class ReadsOfResting(TorchDispatchMode):
    """Records every operator that reads a resting tensor, except copying it (the load itself), aliasing
    it (`.data` bookkeeping) and, where allowed, an embedding lookup."""

    ALLOWED = {"_to_copy", "detach", "alias", "set_", "lift_fresh", "_has_compatible_shallow_copy_type"}

    def __init__(self, rest: dict, allow_embedding: bool = False):
        super().__init__()
        self.storages = set(rest.values())
        self.allowed = self.ALLOWED | ({"embedding"} if allow_embedding else set())
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.allowed:
            for x in tree_flatten((args, kwargs or {}))[0]:
                if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() in self.storages:
                    self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_model_offload_loads_one_component_at_a_time(m9_folder, plain):
    pipe = offloaded(m9_folder, "model")
    assert pipe.device == CPU and pipe.offload.mode == "model"
    rest = resting(pipe)
    seen = []
    for name, module in (("text_encoder", pipe.text_encoder), ("unet", pipe.unet),
                         ("vae", pipe.vae.decoder), ("safety_checker", pipe.safety_checker)):
        module.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, loaded(pipe, rest))))
    watch = ReadsOfResting(rest)
    with watch:
        images = pipe.generate(PROMPT, **GEN).images
    # prompt and negative prompt, 3 PNDM steps = 4 UNet calls, decode, safety check: each alone on the device
    assert seen == [("text_encoder", {"text_encoder"})] * 2 + [("unet", {"unet"})] * 4 + [
        ("vae", {"vae"}), ("safety_checker", {"safety_checker"})]
    assert sorted(set(watch.reads)) == []
    assert loaded(pipe, rest) == set() and pipe.offload.stored == {}  # everything went back
    assert pipe._fast_unet is None
    assert np.array_equal(images, plain.generate(PROMPT, **GEN).images)


def test_model_offload_img2img_and_a_failed_generation(m9_folder, plain):
    pipe = offloaded(m9_folder, "model")
    rest = resting(pipe)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    kw = dict(GEN, image=image, strength=0.7)
    watch = ReadsOfResting(rest)
    with watch:
        out = pipe.generate(PROMPT, **kw).images  # the VAE encoder runs first, through its own hook
    assert watch.reads == [] and loaded(pipe, rest) == set()
    assert np.array_equal(out, plain.generate(PROMPT, **kw).images)

    def fail(*args):
        raise RuntimeError("stop")
    with pytest.raises(RuntimeError, match="stop"):
        pipe.generate(PROMPT, callback_on_step_end=fail, **GEN)
    assert loaded(pipe, rest) == set()  # the UNet went back although the loop failed


def test_sequential_offload_loads_one_module_at_a_time(m9_folder, plain):
    pipe = offloaded(m9_folder, "sequential")
    rest = resting(pipe)
    problems, calls = [], []

    def check(module, args):
        calls.append(module)
        ancestors = {m for m in owners if module in set(m.modules())}
        held = {m for m, _ in pipe.offload.stored}
        if isinstance(module, nn.Embedding):  # looked up in the CPU table: never loaded
            problems.extend(["embedding loaded"] if (module, "weight") in pipe.offload.stored else [])
        elif module not in held or not held <= ancestors:
            problems.append(f"{type(module).__name__}: held {[type(m).__name__ for m in held]}")

    owners = [m for name in COMPONENTS for m in getattr(pipe, name).modules() if m._parameters]
    for module in owners:
        module.register_forward_pre_hook(check)
    watch = ReadsOfResting(rest, allow_embedding=True)
    with watch:
        images = pipe.generate(PROMPT, **GEN).images
    assert problems == [] and len(set(calls)) > 50
    assert watch.reads == []
    with torch.inference_mode(), ReadsOfResting(rest) as strict:  # the watch does see resting tensors read:
        pipe.text_encoder(torch.tensor([[0, 5, 2]]))  # word, token type and position lookups
    assert strict.reads == ["embedding"] * 3
    assert pipe.offload.stored == {} and pipe.unet_runner() is pipe.unet
    assert np.array_equal(images, plain.generate(PROMPT, **GEN).images)


def test_offload_switches_and_errors(m9_folder):
    pipe = offloaded(m9_folder, "sequential")
    with pytest.raises(ValueError, match="device: the pipeline offloads to cpu; call remove_all_hooks"):
        pipe.to("cpu")
    pipe.to(dtype=torch.bfloat16)  # casts the resting tensors
    assert pipe.dtype == torch.bfloat16 and pipe.offload is not None
    offload.enable(pipe, "model", CPU)  # switching mode replaces the hooks
    hooks = sum(len(m._forward_pre_hooks) for name in COMPONENTS for m in getattr(pipe, name).modules())
    assert pipe.offload.mode == "model" and hooks == 3 + 4  # TE, UNet, checker; the VAE's four children
    pipe.remove_all_hooks()
    assert pipe.offload is None and not any(
        m._forward_pre_hooks or m._forward_hooks for name in COMPONENTS for m in getattr(pipe, name).modules())
    for bad, match in (({"device": "cpu"}, "device must be a GPU"),
                       ({"device": "cuda:0", "gpu_id": 1}, "gpu_id=1 and device='cuda:0' both give a GPU index"),
                       ({"device": "cuda", "gpu_id": -1}, "gpu_id must be an int >= 0")):
        with pytest.raises(ValueError, match=f"enable_model_cpu_offload: {match}"):
            pipe.enable_model_cpu_offload(**bad)
    with pytest.raises(ValueError, match="offload: expected None, 'model' or 'sequential', got 'medvram'"):
        altdiff.load(m9_folder, offload="medvram")
    with pytest.raises(ValueError, match="offload: device must be a GPU"):
        altdiff.load(m9_folder, device="cpu", offload="model")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="enable_sequential_cpu_offload: CUDA is not available"):
            pipe.enable_sequential_cpu_offload()


def test_cli_flags():
    parse = build_parser().parse_args
    assert parse(["a cat", "--medvram"]).offload == "model"
    assert parse(["a cat", "--lowvram"]).offload == "sequential"
    assert parse(["a cat"]).offload is None
    with pytest.raises(SystemExit):
        parse(["a cat", "--medvram", "--lowvram"])


def test_cli_batch_and_serve_pass_the_offload_mode_to_load(monkeypatch, tmp_path, capsys, m9_folder):
    from altdiff import batch, cli, pipeline
    from altdiff.api import worker

    seen = []

    def fake_load(source, **kwargs):
        seen.append(kwargs["offload"])
        raise ValueError("not loading")
    for module in (pipeline, batch, worker):
        monkeypatch.setattr(module, "load", fake_load)
    assert cli.main(["a cat", "--medvram", "-o", str(tmp_path / "x.png")]) == 2
    requests = tmp_path / "r.jsonl"
    requests.write_text('{"prompt": "a cat", "seed": 1}\n', encoding="utf-8")
    cli.main(["batch", str(requests), "--out", str(tmp_path / "out"), "--lowvram", "--quiet"])
    with monkeypatch.context() as m:  # serve checks the device first; no GPU is needed to see the flag reach load
        m.setattr(offload, "execution_device", lambda *args: None)
        assert cli.main(["serve", "--model", str(m9_folder), "--medvram", "--port", "1"]) == 2
    assert seen == ["model", "sequential", "model"]
    assert "not loading" in capsys.readouterr().err
    assert cli.main(["serve", "--model", str(m9_folder), "--lowvram", "--device", "cpu"]) == 2
    assert "altdiff serve: error: --medvram/--lowvram: device must be a GPU" in capsys.readouterr().err
    assert seen == ["model", "sequential", "model"]  # refused before loading


def test_safety_checker_is_read_on_first_use(m9_folder, tmp_path):
    pipe = altdiff.load(m9_folder, device="cpu")
    assert isinstance(pipe.__dict__["_safety_checker"], Later)
    assert "safety_checker" not in repr(pipe)
    pipe.to(dtype=torch.bfloat16)  # read onto the pipeline's dtype of the time
    pipe.generate(PROMPT, **GEN)  # read inside inference mode...
    checker = pipe.safety_checker
    assert not isinstance(checker, Later) and checker.concept_embeds.dtype == torch.bfloat16
    with torch.no_grad():
        checker.concept_embeds.mul_(1.0)  # ...yet ordinary tensors, editable outside it


def test_safety_checker_weights_are_checked_at_load(m9_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m9"
    shutil.copytree(m9_folder, folder)
    path = folder / "safety_checker" / "model.safetensors"
    tensors = load_file(path)
    tensors["concept_embeds"] = tensors["concept_embeds"][:, :-1].contiguous()
    save_file(tensors, path)
    with pytest.raises(WeightsError, match="model.safetensors: weights do not fit SafetyChecker; "
                       "1 shape mismatches: concept_embeds"):
        altdiff.load(folder, device="cpu")
