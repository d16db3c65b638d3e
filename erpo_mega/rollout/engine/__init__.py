"""The embedded rollout engine: SGLang's HTTP protocol served by `erpo_mega.models.torch_llm`."""

from erpo_mega.rollout.engine.engine import Engine, EngineUnavailable
from erpo_mega.rollout.engine.http import EngineHTTPServer

__all__ = ["Engine", "EngineHTTPServer", "EngineUnavailable"]
