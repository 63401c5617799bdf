"""NexLM: a self-hosted streaming chat server for large language models."""

__version__ = "0.1.0"
