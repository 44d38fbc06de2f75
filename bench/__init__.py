"""`make bench`: each module `bench/<name>.py` measures one thing and writes docs/benchmarks/<name>.json.

Run one with `python -m bench.<name>` (`--quick` for a small smoke run); `python -m bench.report` then writes
docs/benchmarks.md from every result present.
"""
