"""`altdiff batch`: same images as generate(..., seed=s), failures recorded, resumable, local and on Ray Data."""

import json
import os

import numpy as np
import PIL.Image
import pytest

import altdiff
from altdiff import batch, cli
from altdiff.images import read_infotext
from altdiff.infotext import parse_infotext

STEPS = 2


def write_requests(path, lines):
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode()
                                for line in lines) + b"\n")
    return path


def pixels(path):
    return np.asarray(PIL.Image.open(path), dtype=int)


def count_generate_calls(monkeypatch):
    calls = []

    def counting(*a, **k):
        calls.append(a[0] if a else k.get("prompt"))
        return generate(*a, **k)
    generate = batch.generate
    monkeypatch.setattr(batch, "generate", counting)
    return calls


GOOD = [
    {"prompt": "a (cat:1.3) wearing a hat BREAK [blurry]", "a1111_prompts": True, "seed": 1, "steps": STEPS},
    {"prompt": "一只戴着帽子的猫", "negative_prompt": "低质量", "seed": 2, "num_inference_steps": STEPS,
     "guidance_scale": 6.5, "sampler": "ddim"},
    {"prompt": "beautiful landscape", "num_inference_steps": STEPS, "num_images_per_prompt": 2},
    {"prompt": "油画", "image": "init.png", "strength": 0.6, "num_inference_steps": 4, "seed": 3},
]
BAD = [
    (b"not json", "not a valid JSON line"),
    ({"prompt": "x", "foo": 1}, "unknown argument"),
    ({"negative_prompt": "no prompt"}, "prompt: expected a string"),
    ({"prompt": "x", "seed": -1}, "seed: must be in 0..2**64-1"),
    ({"prompt": "x", "seed": 2**64}, "seed: must be in 0..2**64-1"),
    ({"prompt": "x", "seed": 2**64 - 1, "num_images_per_prompt": 2}, "and the 2 seeds from it"),
    ({"prompt": "x", "seed": 1.5}, "seed: expected an int"),
    ({"prompt": "x", "num_images_per_prompt": 0}, "num_images_per_prompt"),
    (b'{"prompt": "\xff\xfe"}', "not UTF-8"),
    ([1, 2], "expected a JSON object"),
    ({"prompt": "x", "height": 12, "num_inference_steps": STEPS}, "ValueError: height: must be a positive multiple"),
    ({"prompt": "x", "image": "missing.png", "num_inference_steps": STEPS}, "ValueError: image: file not found"),
]


def test_local_batch_same_images_as_generate_and_resume(m9_folder, tmp_path, monkeypatch):
    PIL.Image.fromarray((np.random.default_rng(0).random((32, 32, 4)) * 255).astype(np.uint8), "RGBA").save(
        tmp_path / "init.png")
    lines = GOOD[:2] + [b"   "] + [line for line, _ in BAD] + GOOD[2:] + [GOOD[0]]  # blank line, duplicate
    requests = write_requests(tmp_path / "requests.jsonl", lines)
    out = tmp_path / "out"
    entries = batch.run(requests, out, model=str(m9_folder), device="cpu")

    assert len(entries) == len(GOOD) + len(BAD)  # the duplicate is one request, the blank line none
    by_request = {json.dumps(e["request"], sort_keys=True): e for e in entries}
    for line, message in BAD:
        entry = by_request[json.dumps(line if not isinstance(line, bytes) else line.decode("utf-8", "replace"),
                                      sort_keys=True)]
        assert message in entry["error"] and entry["files"] == []
    pipe = altdiff.load(m9_folder, device="cpu")
    made = {}
    for request in GOOD:
        entry = by_request[json.dumps(request, sort_keys=True)]
        assert entry["error"] is None and entry["nsfw"] == [False] * len(entry["files"])
        kwargs = {batch.ALIASES.get(k, k): v for k, v in request.items()}
        if "image" in kwargs:
            kwargs["image"] = PIL.Image.open(tmp_path / kwargs["image"])
        kwargs["seed"] = entry["seeds"]  # the recorded seed remakes the image (also for the seedless request)
        expected = pipe.generate(progress=False, **kwargs).images
        for name, seed, image in zip(entry["files"], entry["seeds"], expected):
            assert np.array_equal(pixels(out / name), np.asarray(image, dtype=int))
            prompt, negative, params = parse_infotext(read_infotext(out / name))
            assert prompt == request["prompt"] and negative == request.get("negative_prompt", "")
            assert params["Seed"] == str(seed) and params["Model"] == m9_folder.name
            assert params["Steps"] == str(kwargs.get("num_inference_steps"))
            made[name] = pixels(out / name)
    assert by_request[json.dumps(GOOD[1], sort_keys=True)]["seeds"] == [2]
    assert parse_infotext(read_infotext(out / by_request[json.dumps(GOOD[1], sort_keys=True)]["files"][0])
                          )[2]["Sampler"] == "DDIM"
    assert "Denoising strength" in parse_infotext(read_infotext(out / entries[-1]["files"][0]))[2]
    first, second = (made[by_request[json.dumps(r, sort_keys=True)]["files"][0]] for r in GOOD[:2])
    assert np.abs(first - second).max() > 30  # the prompt reaches the image: the equalities above mean something
    manifest = (out / batch.MANIFEST).read_text(encoding="utf-8")
    assert [json.loads(line) for line in manifest.splitlines()] == entries
    assert sorted(p.name for p in out.iterdir()) == sorted([*made, batch.MANIFEST])

    # Rerun: finished requests are skipped; failed ones are tried again (the missing image fails before
    # generate() is called).
    calls = count_generate_calls(monkeypatch)
    stamps = {name: os.stat(out / name).st_mtime_ns for name in made}
    assert batch.run(requests, out, model=str(m9_folder), device="cpu") == entries
    assert calls == ["x"] and {n: os.stat(out / n).st_mtime_ns for n in made} == stamps
    assert (out / batch.MANIFEST).read_text(encoding="utf-8") == manifest
    # A lost image is made again, identically, and the manifest still has one line per request.
    two = by_request[json.dumps(GOOD[2], sort_keys=True)]["files"]
    (out / two[1]).unlink()
    calls.clear()
    assert batch.run(requests, out, model=str(m9_folder), device="cpu") == entries
    assert calls == ["x", GOOD[2]["prompt"]]
    assert np.array_equal(pixels(out / two[1]), made[two[1]])
    assert (out / batch.MANIFEST).read_text(encoding="utf-8") == manifest


def test_grouped_requests_within_one_level_and_a_bad_one_fails_alone(m9_folder, tmp_path, monkeypatch):
    prompts = ["a cat", "a cat wearing a hat", "一只猫", "кошка в шляпе", "قطة", "un chat"]
    lines = [{"prompt": p, "seed": 10 + i, "num_inference_steps": STEPS} for i, p in enumerate(prompts)]
    lines[3]["negative_prompt"] = "blurry"
    lines[4]["negative_prompt"] = 5  # fails inside generate(): its batch is retried request by request
    lines.append({"prompt": "a cat", "seed": 1, "num_inference_steps": STEPS + 1})  # another shape: own batch
    requests = write_requests(tmp_path / "requests.jsonl", lines)
    calls = count_generate_calls(monkeypatch)
    entries = batch.run(requests, tmp_path / "grouped", model=str(m9_folder), device="cpu", batch_size=3)
    assert [isinstance(c, list) for c in calls] == [True, True, False, False, False, False]
    assert [e["error"] is not None for e in entries] == [False] * 4 + [True] + [False] * 2
    assert "negative_prompt" in entries[4]["error"]
    single = batch.run(requests, tmp_path / "single", model=str(m9_folder), device="cpu")
    # The batch size is part of the key (it can move a pixel by a level): pair the runs' entries by request.
    assert [e["seeds"] for e in entries] == [e["seeds"] for e in single]
    diffs = [np.abs(pixels(tmp_path / "grouped" / g["files"][0]) - pixels(tmp_path / "single" / e["files"][0])).max()
             for g, e in zip(entries, single) if e["files"]]
    # A batch of 3 and a batch of 1 round differently inside the convolutions (as in test_cli).
    assert max(diffs) <= 1
    assert np.abs(pixels(tmp_path / "single" / single[0]["files"][0])
                  - pixels(tmp_path / "single" / single[1]["files"][0])).max() > 30


def test_interrupted_run_resumes_on_ray_without_duplicates_or_gaps(m9_folder, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    words = ["a cat", "a hat", "mountains", "a river", "sunset", "一只猫", "山和河流", "кошка", "пейзаж", "قطة"]
    lines = [{"prompt": f"{w}, oil painting" if i % 2 else w, "seed": i, "num_inference_steps": STEPS}
             for i, w in enumerate(words * 2)]
    requests = write_requests(tmp_path / "requests.jsonl", lines)
    reference = batch.run(requests, tmp_path / "local", model=str(m9_folder), device="cpu")
    assert len(reference) == 20 and not any(e["error"] for e in reference)

    out = tmp_path / "out"
    save_png, saved = batch.save_png, []

    def interrupt_on_eighth(*a, **k):
        if len(saved) == 7:
            raise KeyboardInterrupt
        saved.append(save_png(*a, **k))
    monkeypatch.setattr(batch, "save_png", interrupt_on_eighth)
    with pytest.raises(KeyboardInterrupt):
        batch.run(requests, out, model=str(m9_folder), device="cpu")
    monkeypatch.undo()
    stamps = {p.name: os.stat(p).st_mtime_ns for p in saved}
    assert len(stamps) == 7 and len((out / batch.MANIFEST).read_text().splitlines()) == 7

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(ValueError, match="num-gpus-per-worker: 1 requested but the Ray cluster has 0 GPUs"):
            batch.run(requests, out, model=str(m9_folder), device="cpu", use_ray=True, num_gpus_per_worker=1)
        # No --device and no --num-gpus-per-worker: a CPU-only cluster gets CPU workers, whose settings (cpu,
        # fp32) are the local run's, so its finished images are kept.
        entries = batch.run(requests, out, model=str(m9_folder), use_ray=True, concurrency=2)
    finally:
        ray.shutdown()
    assert entries == reference
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "local").iterdir())
    assert {name: os.stat(out / name).st_mtime_ns for name in stamps} == stamps  # not made twice
    manifest = [json.loads(line) for line in (out / batch.MANIFEST).read_text().splitlines()]
    assert manifest == reference
    for e in reference:
        # Ray workers run torch with one thread; allow the one level a different reduction order can flip.
        assert np.abs(pixels(out / e["files"][0]) - pixels(tmp_path / "local" / e["files"][0])).max() <= 1


def test_rerun_with_settings_that_change_pixels_makes_new_images(m9_folder, tmp_path, monkeypatch):
    requests = write_requests(tmp_path / "r.jsonl", [{"prompt": "a cat", "num_inference_steps": STEPS}])
    out = tmp_path / "out"
    first = batch.run(requests, out, model=str(m9_folder), device="cpu")  # fp32, the CPU default
    calls = count_generate_calls(monkeypatch)
    assert batch.run(requests, out, model=str(m9_folder), device="cpu", dtype="fp32") == first  # same settings
    assert calls == []
    keys = [first[0]["key"]]
    for settings in ({"dtype": "bf16"}, {"safety_checker": False}, {"batch_size": 2}):
        entry, = batch.run(requests, out, model=str(m9_folder), device="cpu", **settings)
        assert entry["error"] is None and entry["key"] not in keys, settings
        assert entry["seeds"] == first[0]["seeds"]  # the seed comes from the request alone
        keys.append(entry["key"])
    assert len(calls) == 3
    # Why it matters: the bf16 image is another image, which a skipped rerun would have passed off as made.
    assert not np.array_equal(pixels(out / f"{keys[0]}-0.png"), pixels(out / f"{keys[1]}-0.png"))


def test_cli_batch_subcommand(m9_folder, tmp_path, capsys):
    requests = write_requests(tmp_path / "r.jsonl", [GOOD[0], {"prompt": "x", "bogus": 1}])
    out = tmp_path / "out"
    assert cli.main(["batch", str(requests), "--out", str(out), "--model", str(m9_folder), "--device", "cpu",
                     "--quiet"]) == 1  # one request failed; the other was made
    assert "1 requests done, 1 failed" in capsys.readouterr().err
    assert len(list(out.glob("*.png"))) == 1
    for argv, message in ((["batch", str(tmp_path / "missing.jsonl"), "--out", str(out)], "requests"),
                          (["batch", str(requests), "--out", str(requests)], "--out"),
                          (["batch", str(requests), "--out", str(out), "--batch-size", "0"], "--batch-size"),
                          (["batch", str(requests), "--out", str(out), "--concurrency", "0"], "--concurrency"),
                          (["batch", str(requests), "--out", str(out), "--num-gpus-per-worker", "-1"],
                           "--num-gpus-per-worker")):
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in out.glob("*.png")), batch.MANIFEST])
