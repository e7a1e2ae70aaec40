"""altdiff against diffusers, block by block: `python -m benchmarks --help`. Needs the `bench` extra."""
