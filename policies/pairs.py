"""Preference pairs for DPO, from self-judged scores or from RLCD contrastive sampling.

Length control: judges (small ones especially) tend to prefer longer answers, and DPO learns
whatever separates chosen from rejected, so a length bias in the judge becomes a length bias in
the model. Two optional defences: :func:`length_normalised` removes the part of the scores that
length explains before pairs are picked, and :func:`cap_length_ratio` drops pairs whose chosen
answer is too many times longer than the rejected one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from policies.constraints import Constraint
from policies.repair import repair

KIND_SELF_REWARD = "self_reward"
KIND_RLCD = "rlcd"
KIND_VERIFIED = "verified"
KIND_ANCHORED = "anchored"
KIND_REPAIRED = "repaired"
KIND_ENDED = "ended"
# The strategies a cycle can combine ("verified+self_reward"); "both" is the historical name of
# "self_reward+rlcd".
BASE_STRATEGIES: tuple[str, ...] = (KIND_VERIFIED, KIND_REPAIRED, KIND_ANCHORED, KIND_ENDED, KIND_SELF_REWARD, KIND_RLCD)
# Pairs labelled by code (the checks, whether an answer ended or loops): their label holds in
# any later cycle (replayable).
CHECKED_KINDS: tuple[str, ...] = (KIND_VERIFIED, KIND_REPAIRED, KIND_ANCHORED, KIND_ENDED)
# Strategies that pair a prompt even where an earlier strategy already did: their contrast is
# another one (RLCD: other samples; ended: ending, not the checks).
_ALSO_PAIRED: frozenset[str] = frozenset({KIND_RLCD, KIND_ENDED})
PAIR_STRATEGIES: tuple[str, ...] = (*BASE_STRATEGIES, "both")
_ALIASES = {"both": (KIND_SELF_REWARD, KIND_RLCD)}


def parse_strategy(spec: str | Sequence[str]) -> tuple[str, ...]:
    """The base strategies named by `spec`: one name, names joined by "+", or a list of names,
    in the given order without repeats. Raises ValueError naming the allowed values."""
    names = spec.split("+") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if name not in PAIR_STRATEGIES:
            allowed = ", ".join(repr(s) for s in PAIR_STRATEGIES)
            raise ValueError(f"unknown pair strategy {name!r}; allowed: {allowed}, or several joined by '+'")
        for base in _ALIASES.get(name, (name,)):
            if base not in out:
                out.append(base)
    if not out:
        raise ValueError("pairs.strategy names no strategy; e.g. 'verified' or 'verified+self_reward'")
    return tuple(out)


@dataclass(frozen=True)
class ScoredResponse:
    """One sampled answer with its judge score averaged over the parsed judge samples;
    `mean_score` is None when no judge sample parsed. `length` is its length in tokens."""

    response_id: str
    text: str
    mean_score: float | None
    length: int = 0
    # One bool per constraint of the prompt (policies.constraints.check_all); empty when the
    # prompt carries no constraints.
    checks: tuple[bool, ...] = ()
    truncated: bool = False
    # It copies an instruction sentence of its prompt (policies.constraints.echoes_instructions):
    # never chosen, and the first answer rejected, whatever its checks say.
    echoes: bool = False
    # Cut at max_new_tokens while the loop counts that as a failure (pairs.reject_unfinished, a
    # label form of TRL's missing_eos_penalty): never chosen nor repaired, and rejected right after
    # echoes whatever its checks say, so a finished passing answer is preferred to one that never ends.
    unfinished_fails: bool = False
    # It repeats a line or phrase (policies.repetition.loops) while the loop rejects that
    # (pairs.reject_loops): never chosen nor repaired, and rejected right after echoes.
    loops: bool = False

    @property
    def fails(self) -> bool:
        """Whether a verified pair may reject it: a check fails, or it echoes, loops, or never ended and that counts."""
        return bool(self.checks) and (self.echoes or self.loops or self.unfinished_fails or not self.satisfies_all)

    @property
    def satisfies_all(self) -> bool:
        return bool(self.checks) and all(self.checks)

    @property
    def satisfied_count(self) -> int:
        return sum(self.checks)


@dataclass(frozen=True)
class PreferencePair:
    prompt_id: str
    chosen_id: str
    rejected_id: str
    kind: str  # one of BASE_STRATEGIES
    score_gap: float | None  # chosen minus rejected mean score; None when either is unscored (RLCD)


@dataclass(frozen=True)
class RlcdSample:
    """The two RLCD answers to one prompt. An id or text is None when that side was
    never sampled or failed; such a sample yields no pair."""

    prompt_id: str
    positive_id: str | None
    positive_text: str | None
    negative_id: str | None
    negative_text: str | None


def build_self_reward_pairs(
    responses_by_prompt: Mapping[str, Sequence[ScoredResponse]],
    min_gap: float,
    epsilon: float | None = None,
) -> list[PreferencePair]:
    """Per prompt, the best-scored answer as chosen and the worst as rejected.

    Answers without a score take no part. A prompt gives no pair when fewer than two
    answers are scored, when the gap is below `min_gap` or zero (a tie teaches nothing
    but noise), or when best and worst are the same text (judge noise, no signal).
    Ties within the best or the worst are broken by the smaller response_id so reruns
    give the same pairs. Pairs come in the mapping's prompt order. With `epsilon`, the chosen
    answer is length-controlled (:func:`length_controlled_best`).
    """
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    pairs: list[PreferencePair] = []
    for prompt_id, responses in responses_by_prompt.items():
        pair = _self_reward_pair(prompt_id, responses, min_gap, epsilon)
        if pair is not None:
            pairs.append(pair)
    return pairs


def _self_reward_pair(
    prompt_id: str,
    responses: Sequence[ScoredResponse],
    min_gap: float,
    epsilon: float | None = None,
) -> PreferencePair | None:
    scored = [r for r in responses if r.mean_score is not None]
    if len(scored) < 2:
        return None
    if epsilon is None:
        chosen = min(scored, key=lambda r: (-_score(r), r.response_id))
    else:
        chosen = length_controlled_best(scored, epsilon)
        assert chosen is not None  # scored has two answers

    rejected = min(scored, key=lambda r: (_score(r), r.response_id))
    gap = _score(chosen) - _score(rejected)
    if gap <= 0 or gap < min_gap or chosen.text.strip() == rejected.text.strip():
        return None
    return PreferencePair(prompt_id, chosen.response_id, rejected.response_id, KIND_SELF_REWARD, gap)


def _score(response: ScoredResponse) -> float:
    assert response.mean_score is not None  # callers filter unscored answers first
    return response.mean_score


def build_rlcd_pairs(samples: Iterable[RlcdSample]) -> list[PreferencePair]:
    """One pair per usable sample, in input order: positive chosen, negative rejected.

    Takes `RlcdSample`s rather than a prompt_id -> (ids) mapping because the texts are
    needed to drop identical answers: when both prompts produced the same text the pair
    carries no contrast. Samples missing either side are skipped.
    """
    return [
        PreferencePair(s.prompt_id, s.positive_id, s.negative_id, KIND_RLCD, None)
        for s in samples
        if s.positive_id is not None and s.negative_id is not None and _texts_differ(s)
    ]


def _texts_differ(sample: RlcdSample) -> bool:
    positive = (sample.positive_text or "").strip()
    negative = (sample.negative_text or "").strip()
    return bool(positive) and bool(negative) and positive != negative


def select_pairs(
    strategy: str | Sequence[str],
    self_reward_pairs: Sequence[PreferencePair],
    rlcd_pairs: Sequence[PreferencePair],
    verified_pairs: Sequence[PreferencePair] = (),
    anchored_pairs: Sequence[PreferencePair] = (),
    repaired_pairs: Sequence[PreferencePair] = (),
    ended_pairs: Sequence[PreferencePair] = (),
) -> list[PreferencePair]:
    """The pairs a cycle trains on under `strategy` (see :func:`parse_strategy`), strategy by
    strategy in the order named. A later strategy adds no second pair for a prompt that an
    earlier one already paired, except RLCD (its answers are a different sample) and ended
    (it contrasts ending, not the checks), which add no pair already chosen."""
    by_kind = {
        KIND_SELF_REWARD: self_reward_pairs,
        KIND_RLCD: rlcd_pairs,
        KIND_VERIFIED: verified_pairs,
        KIND_ANCHORED: anchored_pairs,
        KIND_REPAIRED: repaired_pairs,
        KIND_ENDED: ended_pairs,
    }
    chosen: list[PreferencePair] = []
    paired_prompts: set[str] = set()
    paired_answers: set[tuple[str, str]] = set()
    for name in parse_strategy(strategy):
        for pair in by_kind[name]:
            if name not in _ALSO_PAIRED and pair.prompt_id in paired_prompts:
                continue
            if (pair.chosen_id, pair.rejected_id) in paired_answers:
                continue
            chosen.append(pair)
            paired_answers.add((pair.chosen_id, pair.rejected_id))
        paired_prompts |= {p.prompt_id for p in by_kind[name]}
    return chosen


# --- Verifiable-constraint and anchored pairs ---------------------------------------------


def length_controlled_best(responses: Sequence[ScoredResponse], epsilon: float) -> ScoredResponse | None:
    """Meta-Rewarding's length control: among the answers whose score is within `epsilon` of the
    top score, the shortest (then the smaller id). Unscored answers count as tied with each other,
    so among answers no judge scored this is simply the shortest. None for no answers."""
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not responses:
        return None
    scored = [r for r in responses if r.mean_score is not None]
    pool = list(responses)
    if scored:
        top = max(_score(r) for r in scored)
        pool = [r for r in scored if _score(r) >= top - epsilon]
    return min(pool, key=lambda r: (r.length, r.response_id))


def _worst(responses: Sequence[ScoredResponse], near_length: int) -> ScoredResponse:
    """The clearest failure: an answer that echoes the instructions, then one that loops, then one
    that never ended (each when that counts as failing), then fewest satisfied constraints, then lowest score, then the
    length closest to the chosen answer's (so the pair contrasts the checks, not mainly the length)."""
    return min(
        responses,
        key=lambda r: (
            not r.echoes, not r.loops, not r.unfinished_fails, r.satisfied_count, r.mean_score if r.mean_score is not None else 0.0, abs(r.length - near_length), r.response_id,
        ),
    )


def _gap(chosen: ScoredResponse, rejected: ScoredResponse) -> float | None:
    if chosen.mean_score is None or rejected.mean_score is None:
        return None
    return chosen.mean_score - rejected.mean_score


def verified_pair(
    prompt_id: str,
    responses: Sequence[ScoredResponse],
    epsilon: float = 0.0,
    rejected_pool: Sequence[ScoredResponse] | None = None,
    kind: str = KIND_VERIFIED,
    chosen_must_finish: bool = True,
) -> PreferencePair | None:
    """A pair the constraint checks separate: the chosen answer satisfies every constraint, the
    rejected one does not, or echoes the instructions, loops, or never ended where that counts
    (:class:`ScoredResponse`). Among passing answers the judge breaks the tie (length-controlled, see
    :func:`length_controlled_best`); a truncated answer is never chosen. The rejected answer comes
    from `rejected_pool` (default: the same answers). None when the checks separate nothing.
    `chosen_must_finish=False` lets a truncated answer be chosen (for models that never stop)."""
    passing = [r for r in responses if r.satisfies_all and not r.fails and not (chosen_must_finish and r.truncated)]
    failing = [r for r in (responses if rejected_pool is None else rejected_pool) if r.fails]
    chosen = length_controlled_best(passing, epsilon)
    if chosen is None or not failing:
        return None
    rejected = _worst(failing, chosen.length)
    if chosen.text.strip() == rejected.text.strip():
        return None
    return PreferencePair(prompt_id, chosen.response_id, rejected.response_id, kind, _gap(chosen, rejected))


def build_verified_pairs(
    responses_by_prompt: Mapping[str, Sequence[ScoredResponse]],
    epsilon: float = 0.0,
    chosen_must_finish: bool = True,
    max_per_prompt: int = 1,
) -> list[PreferencePair]:
    """Up to `max_per_prompt` :func:`verified_pair`s per prompt whose answers the checks separate,
    in prompt order; each answer takes part in at most one pair (the next pair is made from the
    answers left over), so one prompt's samples can give several correctly labelled pairs."""
    if max_per_prompt < 1:
        raise ValueError(f"max_per_prompt must be >= 1, got {max_per_prompt}")
    pairs: list[PreferencePair] = []
    for prompt_id, responses in responses_by_prompt.items():
        left = list(responses)
        for _ in range(max_per_prompt):
            pair = verified_pair(prompt_id, left, epsilon, chosen_must_finish=chosen_must_finish)
            if pair is None:
                break
            pairs.append(pair)
            left = [r for r in left if r.response_id not in (pair.chosen_id, pair.rejected_id)]
    return pairs


def ended_pair(prompt_id: str, responses: Sequence[ScoredResponse]) -> PreferencePair | None:
    """An answer that ended against one that did not: the rejected answer loops or ran past the
    budget (``truncated``; a loop first, then the fewest checks passed), the chosen one ended
    without looping or echoing and passes at least as many checks (the most, then the shortest).

    The gate and the suites read answers greedily, and a small model's greedy answers loop or run
    on where its samples end; with ``respond.greedy_sample`` such an answer is among the
    responses, and this pair pushes that path down even where no answer passes its checks.
    None when no answer runs on or none ended."""
    running_on = [r for r in responses if r.loops or r.truncated]
    ended = [r for r in responses if not (r.loops or r.truncated or r.echoes)]
    if not running_on or not ended:
        return None
    rejected = min(running_on, key=lambda r: (not r.loops, r.satisfied_count, r.response_id))
    allowed = [r for r in ended if r.satisfied_count >= rejected.satisfied_count]
    if not allowed:
        return None
    chosen = min(allowed, key=lambda r: (-r.satisfied_count, r.length, r.response_id))
    return PreferencePair(prompt_id, chosen.response_id, rejected.response_id, KIND_ENDED, _gap(chosen, rejected))


def build_ended_pairs(responses_by_prompt: Mapping[str, Sequence[ScoredResponse]]) -> list[PreferencePair]:
    """One :func:`ended_pair` per prompt that has one, in prompt order."""
    return [pair for prompt_id, responses in responses_by_prompt.items() if (pair := ended_pair(prompt_id, responses)) is not None]


def repaired_response_id(source_id: str) -> str:
    """The provisional id of the repaired version of answer `source_id` (the stage stores it as a response)."""
    return f"repaired:{source_id}"


def build_repaired_pairs(
    responses_by_prompt: Mapping[str, Sequence[ScoredResponse]],
    constraints_by_prompt: Mapping[str, Sequence[Constraint]],
    max_per_prompt: int = 1,
    chosen_must_finish: bool = True,
) -> tuple[list[PreferencePair], dict[str, str]]:
    """Verifier-guided repair pairs (:mod:`policies.repair`): up to `max_per_prompt` failing
    answers per prompt, in sample order, each paired as rejected with its repaired text as chosen.
    An answer that echoes the instructions or loops is not repaired (its repair would too). A
    cut answer is not repaired while `chosen_must_finish` or `unfinished_fails` (its repair would
    still end mid-way).
    Returns the pairs (each chosen id is a :func:`repaired_response_id`) and the repaired text
    under each such id."""
    if max_per_prompt < 1:
        raise ValueError(f"max_per_prompt must be >= 1, got {max_per_prompt}")
    pairs: list[PreferencePair] = []
    texts: dict[str, str] = {}
    for prompt_id, responses in responses_by_prompt.items():
        constraints = constraints_by_prompt.get(prompt_id) or ()
        made = 0
        for response in responses:
            if made == max_per_prompt:
                break
            if response.satisfies_all or not response.checks or response.echoes or response.loops or response.unfinished_fails \
                    or (chosen_must_finish and response.truncated):
                continue
            fixed = repair(constraints, response.text)
            if fixed is None or fixed.strip() == response.text.strip():
                continue
            chosen_id = repaired_response_id(response.response_id)
            texts[chosen_id] = fixed
            pairs.append(PreferencePair(prompt_id, chosen_id, response.response_id, KIND_REPAIRED, None))
            made += 1
    return pairs, texts


def build_anchored_pairs(
    responses_by_prompt: Mapping[str, Sequence[ScoredResponse]],
    anchor_by_prompt: Mapping[str, Sequence[ScoredResponse]],
    min_gap: float,
    epsilon: float = 0.0,
    chosen_must_finish: bool = True,
) -> list[PreferencePair]:
    """Temporal Self-Rewarding: the chosen answer comes from the current model, the rejected one
    from the initial model (`anchor_by_prompt`, the same prompts), so the contrast does not shrink
    as the policy's own answers converge. With constraints the checks decide (chosen passes all,
    rejected fails one); without, the judge does: current best (length-controlled) against the
    anchor's worst, kept when the score gap is at least `min_gap` and positive."""
    if min_gap < 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    pairs: list[PreferencePair] = []
    for prompt_id, responses in responses_by_prompt.items():
        anchor = anchor_by_prompt.get(prompt_id, ())
        if any(r.checks for r in responses):
            pair = verified_pair(prompt_id, responses, epsilon, anchor, KIND_ANCHORED, chosen_must_finish)
        else:
            pair = _judged_anchored_pair(prompt_id, responses, anchor, min_gap, epsilon, chosen_must_finish)
        if pair is not None:
            pairs.append(pair)
    return pairs


def _judged_anchored_pair(
    prompt_id: str, responses: Sequence[ScoredResponse], anchor: Sequence[ScoredResponse], min_gap: float, epsilon: float,
    chosen_must_finish: bool,
) -> PreferencePair | None:
    candidates = [r for r in responses if r.mean_score is not None and not (chosen_must_finish and r.truncated)]
    chosen = length_controlled_best(candidates, epsilon)
    scored_anchor = [r for r in anchor if r.mean_score is not None]
    if chosen is None or not scored_anchor:
        return None
    rejected = min(scored_anchor, key=lambda r: (_score(r), r.response_id))
    gap = _score(chosen) - _score(rejected)
    if gap <= 0 or gap < min_gap or chosen.text.strip() == rejected.text.strip():
        return None
    return PreferencePair(prompt_id, chosen.response_id, rejected.response_id, KIND_ANCHORED, gap)


# --- Length control -------------------------------------------------------------------


def length_score_slope(responses_by_prompt: Mapping[str, Sequence[ScoredResponse]]) -> float:
    """Judge-score points per token of answer length, compared within each prompt.

    The pooled within-prompt least-squares slope: sum over prompts of
    (length - prompt mean length) * (score - prompt mean score), divided by the sum of squared
    length deviations. Within-prompt, because pairs are made within a prompt and prompts
    differ in how long a good answer is. 0.0 when no prompt has two scored answers of
    different lengths.
    """
    covariance = variance = 0.0
    for responses in responses_by_prompt.values():
        scored = [r for r in responses if r.mean_score is not None]
        if len(scored) < 2:
            continue
        mean_length = sum(r.length for r in scored) / len(scored)
        mean_score = sum(_score(r) for r in scored) / len(scored)
        covariance += sum((r.length - mean_length) * (_score(r) - mean_score) for r in scored)
        variance += sum((r.length - mean_length) ** 2 for r in scored)
    return covariance / variance if variance > 0 else 0.0


def length_normalised(
    responses_by_prompt: Mapping[str, Sequence[ScoredResponse]],
) -> dict[str, list[ScoredResponse]]:
    """The same answers with the length effect taken out of their scores.

    Each score becomes score - slope * (length - mean length of the prompt's scored answers),
    with the slope of :func:`length_score_slope`: what is left is the judge's opinion at equal
    length. Only differences within a prompt matter to pairing, so the scores are not clamped
    back into [1, 5]. Unscored answers stay unscored.
    """
    slope = length_score_slope(responses_by_prompt)
    adjusted: dict[str, list[ScoredResponse]] = {}
    for prompt_id, responses in responses_by_prompt.items():
        scored = [r for r in responses if r.mean_score is not None]
        mean_length = sum(r.length for r in scored) / len(scored) if scored else 0.0
        adjusted[prompt_id] = [
            r if r.mean_score is None else replace(r, mean_score=r.mean_score - slope * (r.length - mean_length))
            for r in responses
        ]
    return adjusted


def cap_length_ratio(
    pairs: Sequence[PreferencePair],
    lengths: Mapping[str, int],
    max_ratio: float,
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(kept, dropped): a pair is dropped when its chosen answer is more than ``max_ratio``
    times as long as its rejected one (a longer rejected answer is never a reason to drop).

    ``lengths`` maps response ids to token counts; every id in ``pairs`` must be there. A
    non-empty chosen answer against an empty rejected one counts as infinitely longer.
    """
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1 (a chosen answer may always be as long as the rejected one), got {max_ratio}")
    kept: list[PreferencePair] = []
    dropped: list[PreferencePair] = []
    for pair in pairs:
        chosen, rejected = lengths[pair.chosen_id], lengths[pair.rejected_id]
        (dropped if chosen > max_ratio * rejected else kept).append(pair)
    return kept, dropped
