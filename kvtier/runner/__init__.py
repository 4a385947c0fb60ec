"""Reference paged-attention model runner: the model, its G1 page pool and the hooks kvtier plugs into."""

from kvtier.runner.hooks import KVHooks
from kvtier.runner.kv_cache import PagedKVPool, PoolExhaustedError
from kvtier.runner.model import LlamaModel, ModelConfig
from kvtier.runner.runner import Generation, Runner, TurnStats

__all__ = ["Generation", "KVHooks", "LlamaModel", "ModelConfig", "PagedKVPool", "PoolExhaustedError", "Runner",
           "TurnStats"]
