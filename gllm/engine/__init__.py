"""The engine: requests, scheduling, batching and the async API.

    from gllm.engine import LLMEngine, GeneratorParams, GenerationRequest
"""

from gllm.engine.llm_engine import LLMEngine, StepOutput
from gllm.engine.params import GenerationRequest, GenerationResult, GeneratorParams, TokenDelta
from gllm.engine.scoring import CandidateScore, ScoreRequest, ScoreResult

__all__ = [
    "CandidateScore",
    "GenerationRequest",
    "GenerationResult",
    "GeneratorParams",
    "LLMEngine",
    "ScoreRequest",
    "ScoreResult",
    "StepOutput",
    "TokenDelta",
]
