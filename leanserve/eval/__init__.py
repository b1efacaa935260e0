"""`leanserve eval`: quality beside cost. Tasks (`tasks.py`) reduced to one backend contract
(`backend.py`), run and timed (`run.py`), compared with paired statistics (`stats.py`, `compare.py`),
drawn as a quality-vs-cost chart (`html.py`). Guide: docs/eval.md.

Nothing here imports torch or the model at module level; only the in-process backend does.
"""
