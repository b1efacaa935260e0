"""Load generator and report for any OpenAI-compatible server: TTFT, TPOT, ITL, E2E latency,
throughput, goodput and $ per million tokens (``leanserve bench``; guide in docs/bench.md).

Modules: ``workloads`` (what is sent), ``client`` (HTTP streaming and load shapes), ``metrics``
(records -> vLLM-named metrics), ``runner`` (warm-up, single run or sweep, result document),
``report`` (terminal tables, self-contained HTML), ``cli`` (argparse wiring). The fake server with
exactly known timing that the tests measure against is ``tests/stub_server.py``. Kept import-light
on purpose: the top-level CLI imports ``leanserve.bench.cli`` at start-up.
"""
