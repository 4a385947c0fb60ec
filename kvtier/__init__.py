"""kvtier: a tiered KV-cache offload engine for agentic LLM inference."""

__version__ = "0.1.0"
