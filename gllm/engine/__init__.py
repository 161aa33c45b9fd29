"""The engine: requests, scheduling, batching and the async API.

    from gllm.engine import LLMEngine, GeneratorParams, GenerationRequest
"""

from gllm.engine.llm_engine import LLMEngine, StepOutput
from gllm.engine.params import GenerationRequest, GenerationResult, GeneratorParams, TokenDelta

__all__ = ["GenerationRequest", "GenerationResult", "GeneratorParams", "LLMEngine", "StepOutput", "TokenDelta"]
