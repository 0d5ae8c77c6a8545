"""RLCD contrastive principles (Yang et al., "RLCD: Reinforcement Learning from
Contrastive Distillation", 2024).

Each prompt is answered twice by the same model: once under a system instruction that
pushes toward a principle and once under its opposite. The positive answer is labelled
chosen and the negative rejected without any judge, because the two prompts were built
to differ in the direction we want. The preference pair is trained on the bare user
instruction: the system instructions only steer sampling and must not reach DPO.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PrinciplePair:
    """A principle as two opposite one-sentence system instructions."""

    name: str
    positive: str
    negative: str


DEFAULT_PRINCIPLE_PAIRS: tuple[PrinciplePair, ...] = (
    PrinciplePair(
        name="helpfulness",
        positive="You are a helpful assistant who answers the user's request directly, completely and accurately.",
        negative="You are an unhelpful assistant who gives vague, incomplete answers that "
        "avoid the substance of the user's request.",
    ),
    PrinciplePair(
        name="harmlessness",
        positive="You are a careful assistant who is kind and respectful and steers away "
        "from anything that could cause harm.",
        negative="You are a careless assistant who is rude and dismissive and ignores "
        "whether your advice could cause harm.",
    ),
    PrinciplePair(
        name="conciseness",
        positive="You are a concise assistant who gives well-organized answers without filler or repetition.",
        negative="You are a rambling assistant who pads answers with filler, digressions and repetition.",
    ),
    PrinciplePair(
        name="honesty",
        positive="You are an honest assistant who states only what you believe is true "
        "and says plainly when you are unsure.",
        negative="You are a deceptive assistant who states guesses as facts and hides any uncertainty.",
    ),
    PrinciplePair(
        name="reasoning",
        positive="You are a rigorous assistant who reasons step by step and checks your answer before giving it.",
        negative="You are a sloppy assistant who jumps to conclusions without checking your reasoning.",
    ),
)


def rlcd_messages(instruction: str, pair: PrinciplePair, positive: bool) -> list[dict[str, str]]:
    """Chat messages that sample the positive or negative side of `pair` for `instruction`."""
    system = pair.positive if positive else pair.negative
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": instruction},
    ]


def pick_principle(
    prompt_index: int,
    pairs: Sequence[PrinciplePair] = DEFAULT_PRINCIPLE_PAIRS,
) -> PrinciplePair:
    """The pair for the `prompt_index`-th prompt, round-robin, so a batch covers every
    principle evenly and a rerun picks the same pair for the same prompt."""
    if not pairs:
        raise ValueError("pairs must not be empty")
    if prompt_index < 0:
        raise ValueError(f"prompt_index must be >= 0, got {prompt_index}")
    return pairs[prompt_index % len(pairs)]
