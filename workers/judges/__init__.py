"""Judges: one protocol (score, compare, label), one module per backend.

See ``workers.judges.base`` for the protocol and ``workers.judges.registry`` for how a backend
registers itself and how the configuration picks one. Torch-free to import.
"""

from workers.judges.base import (
    Comparison,
    Judge,
    JudgeCapabilityError,
    JudgeContext,
    JudgePrompt,
    JudgeUnavailable,
    Labels,
    Score,
)
from workers.judges.registry import build_judge, judge_names, register_judge

__all__ = [
    "Comparison",
    "Judge",
    "JudgeCapabilityError",
    "JudgeContext",
    "JudgePrompt",
    "JudgeUnavailable",
    "Labels",
    "Score",
    "build_judge",
    "judge_names",
    "register_judge",
]
