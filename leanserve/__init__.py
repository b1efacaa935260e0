"""leanserve: an LLM inference server that makes cost a first-class output."""

__version__ = "0.1.0"
