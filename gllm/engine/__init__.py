"""The engine: requests, scheduling, batching and the async API.

    from gllm.engine import LLMEngine, GeneratorParams, GenerationRequest
"""

from gllm.engine.llm_engine import LLMEngine, StepOutput
from gllm.engine.params import GenerationRequest, GenerationResult, GeneratorParams, TokenDelta
from gllm.engine.saved_states import RestoreResult, SnapshotRequest, SnapshotResult
from gllm.engine.scoring import CandidateScore, ScoreRequest, ScoreResult
from gllm.engine.snapshot import StateError

__all__ = [
    "CandidateScore",
    "GenerationRequest",
    "GenerationResult",
    "GeneratorParams",
    "LLMEngine",
    "RestoreResult",
    "ScoreRequest",
    "ScoreResult",
    "SnapshotRequest",
    "SnapshotResult",
    "StateError",
    "StepOutput",
    "TokenDelta",
]
