"""The serving engine: paged KV cache, continuous batching, jitted multi-step decode."""

from engine.config import EngineConfig
from engine.llm import LLM
from engine.request import RequestOutput, SamplingParams
from engine.structured_output import StructuredOutputs

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams", "StructuredOutputs"]
