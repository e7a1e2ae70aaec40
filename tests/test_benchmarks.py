"""Smoke test of the benchmark harness (`python -m benchmarks`) on the tiny m9 pipeline, so it cannot rot.
No timing assertions: only that every block runs for both libraries, that the table and JSON are written, and
that both libraries computed the same thing (which fails if either side loads or runs the wrong model)."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds the benchmarks package

from benchmarks.__main__ import ALL_BLOCKS, main  # noqa: E402  (psutil comes with the test extra)

TINY = ["--device", "cpu", "--size", "32", "--steps", "2", "--tiled-size", "64", "--tile", "32", "--repeats", "1"]


def test_harness_runs_every_block_on_the_tiny_model(m9_folder, tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = main(["--folder", str(m9_folder), "--json", str(out), *TINY])
    table = capsys.readouterr().out

    blocks = [r.block for r in results]
    assert blocks == ["load", "first e2e, fresh process", "load → first image, fresh process", "tokenizer",
                      "text encoder", "UNet step", "UNet step, channels_last", "VAE decode", "VAE encode",
                      "VAE tiled decode", "safety checker", "sampler overhead", "end to end",
                      "e2e, altdiff webui family", "e2e, altdiff diffusers family"]
    for r in results:
        assert set(r.times) == {"altdiff", "diffusers"}
        assert all(len(t) == 1 and t[0] > 0 for t in r.times.values()), r.block
        assert r.ratio is not None and r.ratio > 0
        assert f"| {r.block} |" in table
    # the webui family makes the UNet calls diffusers makes for the same sampler: one per step
    for r in results[-2:]:
        altdiff_calls, diffusers_calls = (int(n) for n in re.findall(r"\d+", r.note))
        assert altdiff_calls == diffusers_calls == int(TINY[TINY.index("--steps") + 1]), r.note
    errors = {r.block: r.error for r in results if r.error is not None}
    assert errors["safety checker"] == 0  # same NSFW flags
    assert errors["end to end"] <= 1  # uint8 levels
    assert max(v for k, v in errors.items() if k not in ("safety checker", "end to end")) < 1e-4

    saved = json.loads(out.read_text(encoding="utf-8"))
    assert [row["block"] for row in saved["results"]] == blocks
    assert saved["settings"]["dtype"] == "fp32" and saved["settings"]["size"] == 32


def test_opt_in_blocks_and_argument_errors(m9_folder, capsys, monkeypatch):
    # torch.compile as the identity: the compiled blocks' plumbing without minutes of compilation.
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    results = main(["--folder", str(m9_folder), "--blocks", "sampler", "e2e_tiled", "unet_compiled",
                    "e2e_compiled", "throughput", "tome", "deepcache", "tome_compiled", "deepcache_compiled", *TINY])
    four_way = ("compiled", "altdiff compiled vs diffusers eager", "eager (same rounds)")
    assert [r.block for r in results] == [f"UNet step, {r}" for r in four_way] + [
        "sampler overhead", "e2e, ToMe 0.5 (diffusers + tomesd)", "e2e, no ToMe",
        "e2e, DeepCache 3 (diffusers + deepcache)"] + [f"e2e, {knob}, {r}" for knob in ("ToMe 0.5", "DeepCache 3")
                                                       for r in four_way] + ["end to end, VAE tiling"] + [
        f"end to end, {r}" for r in four_way] + ["throughput, batch 8"]
    errors = {r.block: r.error for r in results}
    assert all(errors[f"UNet step, {r}"] < 1e-4 for r in four_way)
    assert all(errors[f"end to end, {r}"] <= 1 for r in four_way)
    assert errors["end to end, VAE tiling"] <= 1 and errors["throughput, batch 8"] <= 1
    assert errors["e2e, DeepCache 3 (diffusers + deepcache)"] <= 1
    assert all(errors[f"e2e, {knob}, {r}"] <= 1 for knob in ("ToMe 0.5", "DeepCache 3") for r in four_way)
    assert errors["e2e, ToMe 0.5 (diffusers + tomesd)"] <= 1 and "faster with it" in results[4].note
    assert all(len(r.times["altdiff"]) == 1 for r in results)
    by_block = {r.block: r for r in results}
    assert "over own eager: altdiff" in results[0].note and "64x64" in by_block["end to end, VAE tiling"].shape
    assert "images/s" in capsys.readouterr().out
    assert "load" in ALL_BLOCKS
    for bad in (["--blocks", "nope"], ["--repeats", "0"], ["--device", "tpu"], ["--dtype", "int8"],
                ["--device", "cpu", "--blocks", "offload"]):
        with pytest.raises(SystemExit) as e:
            main(["--folder", str(m9_folder), *bad])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--repeats must be a positive int" in err and "--blocks offload: CUDA only" in err
