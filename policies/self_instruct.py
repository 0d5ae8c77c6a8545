"""Self-Instruct prompt generation (Wang et al., 2023): show the model a few tasks, let it
continue the list, keep what is new, well formed and not a near-copy of what we have.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

SEED_PROMPTS_RESOURCE = "data/seed_prompts.json"

# Markers of our own templates and of chat formatting. A generated "task" containing one
# is the model regurgitating its prompt, not inventing an instruction.
TEMPLATE_MARKERS: tuple[str, ...] = (
    "<user_question",
    "</user_question",
    "<response",
    "</response",
    "score:",
    "winner:",
    "additive 5-point",
    "<|",
    "|>",
    "</s>",
    "<s>",
    "[inst]",
    "[/inst]",
)

# Where a model's continuation has clearly left the task list: chat/end-of-text tokens
# or our judge templates. Everything from here on is dropped.
_BROKEN_LINE = re.compile(
    r"<\|[^|]*\|>|</s>|\[/?INST\]|<\s*/?\s*(?:user_question|response)\b|\b(?:score|winner)\s*:",
    re.IGNORECASE,
)

# "Task 7: ...", "**Task 7.** ...", "7. ...", "7) ...", "- ...", "* ...", "• ...".
_TASK_MARKER = re.compile(
    r"""^\s*[*_]*\s*
    (?:
        task\s*(?P<task_number>\d+)\s*[*_]*\s*[:.)\-]
      | (?P<list_number>\d+)[.)](?=\s)
      | [-*•](?=\s)
    )
    [*_]*\s*(?P<body>.*)$""",
    re.IGNORECASE | re.VERBOSE,
)


def load_seed_prompts() -> list[str]:
    """The hand-written seed instructions shipped in `policies/data/seed_prompts.json`."""
    return load_task_list(SEED_PROMPTS_RESOURCE)


def load_task_list(resource: str) -> list[str]:
    """A packaged JSON list of task strings, `resource` relative to the policies package."""
    raw = resources.files("policies").joinpath(resource).read_text(encoding="utf-8")
    prompts = json.loads(raw)
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{resource} must be a JSON list of strings")
    return prompts


# --- Few-shot selection and the generation prompt -------------------------------------


def select_few_shot(
    seed: Sequence[str],
    earlier: Sequence[str],
    k: int,
    rng: random.Random,
    earlier_fraction: float = 0.5,
) -> list[str]:
    """Up to `k` distinct example tasks: about `earlier_fraction` of them from prompts
    accepted in earlier cycles, the rest from the seed set, in shuffled order.

    Mixing in the model's own accepted prompts is what lets the pool drift beyond the
    seed; keeping seed examples anchors it to well-formed instructions. When one source
    runs short the other fills the gap; fewer than `k` come back only if both run out.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if not 0.0 <= earlier_fraction <= 1.0:
        raise ValueError(f"earlier_fraction must be within [0, 1], got {earlier_fraction}")

    seed_pool = _distinct_by_normal_form(seed)
    seen = {normalize_prompt(p) for p in seed_pool}
    earlier_pool = [p for p in _distinct_by_normal_form(earlier) if normalize_prompt(p) not in seen]

    want_earlier = min(round(k * earlier_fraction), len(earlier_pool))
    want_seed = min(k - want_earlier, len(seed_pool))
    want_earlier = min(k - want_seed, len(earlier_pool))  # top up if the seed ran short

    chosen = rng.sample(earlier_pool, want_earlier) + rng.sample(seed_pool, want_seed)
    rng.shuffle(chosen)
    return chosen


def _distinct_by_normal_form(prompts: Sequence[str]) -> list[str]:
    by_form: dict[str, str] = {}
    for prompt in prompts:
        by_form.setdefault(normalize_prompt(prompt), prompt)
    by_form.pop("", None)
    return list(by_form.values())


SELF_INSTRUCT_TOPICS = (
    "coding", "math", "writing", "science", "history", "advice", "reasoning", "summarization", "classification",
    "brainstorming", "everyday how-to",
)


# Everyday subjects a request can be steered to (prompts.topic_rotation): a small model writes
# the same few tasks again when asked the same way, and each round naming other subjects moves it.
ROTATING_TOPICS = (
    "cooking", "gardening", "personal budgeting", "travel planning", "exercise", "pets", "home repair",
    "writing emails", "job interviews", "studying", "music", "team sports", "the weather", "space",
    "wild animals", "healthy sleep", "inventions", "geography", "arithmetic", "Python programming",
    "spreadsheets", "photography", "friendship", "raising children", "recycling", "cars", "shopping",
    "holidays", "board games", "novels", "films", "painting", "poetry", "time management",
    "public speaking", "social media", "city life", "the ocean", "houseplants", "chemistry", "physics",
    "learning a language", "good manners", "volunteering", "camping", "birthdays", "coffee and tea",
    "first aid", "moving house", "small businesses",
)


def rotating_topics(rng: random.Random, k: int = 2) -> list[str]:
    """`k` distinct subjects for one self-instruct request, drawn from :data:`ROTATING_TOPICS`."""
    return rng.sample(ROTATING_TOPICS, k)


def render_self_instruct_prompt(examples: Sequence[str], n_new: int, topics: Sequence[str] = ()) -> str:
    """A numbered task list that ends on an open "Task N:" line for the model to continue.

    The continuation therefore usually starts with the body of task N and no marker;
    `parse_generated_prompts` accounts for that. With `topics` the header asks for tasks about
    those subjects instead of naming the general kinds.
    """
    if n_new < 1:
        raise ValueError(f"n_new must be >= 1, got {n_new}")
    subjects = f"about {' or '.join(topics)}" if topics else f"(for example {', '.join(SELF_INSTRUCT_TOPICS)})"
    header = (
        f"Come up with {n_new} new, diverse tasks for an AI assistant. Vary the topic "
        f"{subjects} and the kind of "
        "request. Each task is a single self-contained instruction on one line, written "
        "the way a user would ask it. Do not answer the tasks."
    )
    listed = [f"Task {i}: {_one_line(example)}" for i, example in enumerate(examples, start=1)]
    return "\n".join([header, "", *listed, f"Task {len(examples) + 1}:"])


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- Parsing the continuation ---------------------------------------------------------


def parse_generated_prompts(text: str) -> list[str]:
    """Tasks from the model's continuation of a task list, in order.

    A task is one line. Marked lines ("Task 7: ...", "7. ...", "- ...") are tasks; an
    unmarked first line is the body of the open "Task N:" the prompt ended on, unless it
    reads as a preamble ("Here are five tasks:"). Later unmarked lines are the model
    answering a task or chatting, and are skipped. Parsing stops at the first sign the
    output has left the list: chat/end tokens, our judge templates, or numbering that
    goes backwards (the model has started a new list or is looping).
    """
    tasks: list[str] = []
    last_number = 0
    before_first_content = True
    for line in text.splitlines():
        if _BROKEN_LINE.search(line):
            break
        if not line.strip():
            continue
        marker = _TASK_MARKER.match(line)
        opens_output, before_first_content = before_first_content, False
        if marker is None:
            if opens_output and _is_task_body(line):
                tasks.append(line.strip())
            continue
        number = marker.group("task_number") or marker.group("list_number")
        if number is not None:
            if int(number) <= last_number:
                break
            last_number = int(number)
        body = marker.group("body").strip().strip("*_").strip()
        if body:
            tasks.append(body)
    return tasks


def clean_generated_tasks(tasks: Sequence[str]) -> list[str]:
    """`tasks` (parsed) with the debris a small model leaves in them removed, and those that are
    not tasks at all dropped (seen in SmolLM2-135M's lists: "Explain 3) How to celebrate
    birthdays.", "A: I'm an AI that helps ...", the header's topic list copied as a task)."""
    return [task for task in map(_cleaned_task, tasks) if task]


_PREAMBLE = re.compile(r"^\W*(?:sure|certainly|of course|okay|ok|here (?:are|is))\b", re.IGNORECASE)


def _is_task_body(line: str) -> bool:
    # Chat-tuned models often open with "Sure! Here are five tasks:" before the list.
    stripped = line.strip()
    return not stripped.endswith(":") and _PREAMBLE.match(stripped) is None


# "Explain 3) How to ...", "Explain 3. How to ...": a list number inside a task, before a
# capitalised word ("N)" anywhere; "N." only after the first word, so "Python 3. It ..." stays).
_INNER_ENUMERATOR = re.compile(r"(?:(?<=\w )\d{1,2}\)|^(?P<lead>\w+ )\d{1,2}\.)\s+(?P<initial>[A-Z])(?=[a-z]|\s)")
_QUESTION_LABEL = re.compile(r"^(?:q|question|instruction|request|text \d{1,2})\s*:\s*", re.IGNORECASE)
_ANSWER_LABEL = re.compile(r"^(?:(?:a|answer|another answer|response|output)\s*:|p\.\s?s\.)", re.IGNORECASE)
# A task that points into the list ("a masterclass on [TASK 9]") is not self-contained.
_LIST_REFERENCE = re.compile(r"\btask\s*\d", re.IGNORECASE)
# The request's topic list copied as a task names several of them; a real task hardly ever does.
# One-word topics only ("everyday how-to" would count "how" and "to"), plus the variant SmolLM2 writes.
HEADER_TOPICS = frozenset(topic for topic in SELF_INSTRUCT_TOPICS if " " not in topic) | {"summary"}
MAX_HEADER_TOPICS = 3


def _cleaned_task(task: str) -> str | None:
    if _ANSWER_LABEL.match(task) or _LIST_REFERENCE.search(task):
        return None
    if len(HEADER_TOPICS & set(normalize_prompt(task).split())) > MAX_HEADER_TOPICS:
        return None
    task = _QUESTION_LABEL.sub("", task)
    return _INNER_ENUMERATOR.sub(_without_enumerator, task)


def _without_enumerator(match: re.Match[str]) -> str:
    initial = match.group("initial")
    return (match.group("lead") or "") + (initial if initial == "I" else initial.lower())


# --- Normalisation, overlap and de-duplication ----------------------------------------


def normalize_prompt(text: str) -> str:
    """Lower-case, punctuation replaced by spaces, whitespace collapsed.

    Punctuation becomes a space rather than vanishing, so "well-known" and "well known"
    compare equal instead of "wellknown" matching neither.
    """
    without_punctuation = re.sub(r"[^\w\s]|_", " ", text.lower())
    return " ".join(without_punctuation.split())


def ngram_overlap(a: str, b: str, n: int = 3) -> float:
    """Containment of word n-grams: |A ∩ B| / min(|A|, |B|), on normalised text.

    Containment rather than Jaccard because the usual near-copy in self-instruct output
    is an example task with a word swapped or a clause appended; Jaccard dilutes both by
    the longer prompt's extra n-grams. The price: a short prompt counts as overlapping
    any longer prompt that contains it whole.

    When either prompt has fewer than `n` words the n-gram size drops to the shorter
    prompt's length, so short prompts are still compared word for word instead of
    overlapping nothing. Two empty prompts overlap fully; empty vs non-empty not at all.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return _overlap_of_words(tuple(normalize_prompt(a).split()), tuple(normalize_prompt(b).split()), n)


def _overlap_of_words(words_a: tuple[str, ...], words_b: tuple[str, ...], n: int) -> float:
    if not words_a or not words_b:
        return 1.0 if words_a == words_b else 0.0
    size = min(n, len(words_a), len(words_b))
    grams_a = _ngrams(words_a, size)
    grams_b = _ngrams(words_b, size)
    return len(grams_a & grams_b) / min(len(grams_a), len(grams_b))


@lru_cache(maxsize=8192)
def _ngrams(words: tuple[str, ...], n: int) -> frozenset[tuple[str, ...]]:
    # Cached because deduplicate compares every candidate with the whole existing pool.
    return frozenset(words[i : i + n] for i in range(len(words) - n + 1))


def deduplicate(
    candidates: Sequence[str],
    existing: Sequence[str],
    max_overlap: float = 0.7,
    n: int = 3,
) -> list[str]:
    """Candidates that are neither an exact (normalised) duplicate nor a near-duplicate
    (`ngram_overlap` > `max_overlap`) of an existing prompt or of a candidate kept
    earlier in the same batch. Input order is preserved; the first of a group survives.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    existing_words = [tuple(normalize_prompt(p).split()) for p in existing]
    seen_forms = {" ".join(words) for words in existing_words}
    reference = [words for words in existing_words if words]
    kept: list[str] = []
    for candidate in candidates:
        words = tuple(normalize_prompt(candidate).split())
        form = " ".join(words)
        if not words or form in seen_forms:
            continue
        if any(_overlap_of_words(words, other, n) > max_overlap for other in reference):
            continue
        kept.append(candidate)
        seen_forms.add(form)
        reference.append(words)
    return kept


# --- Quality filter -------------------------------------------------------------------


def filter_prompts(
    prompts: Sequence[str],
    min_words: int = 3,
    max_words: int = 80,
    min_alpha_ratio: float = 0.5,
    markers: Sequence[str] = TEMPLATE_MARKERS,
) -> list[str]:
    """Prompts (stripped, order kept) that look like real instructions: `min_words` to
    `max_words` words, not starting with punctuation or a symbol, at least `min_alpha_ratio` of
    their non-space characters letters, and free of template/chat `markers`
    (case-insensitive).

    The letter ratio catches the symbol soup a weak or random model emits; 0.5 still
    admits arithmetic prompts that wrap their numbers in words.
    """
    lowered_markers = [marker.lower() for marker in markers]
    kept: list[str] = []
    for prompt in prompts:
        text = prompt.strip()
        if (
            min_words <= len(text.split()) <= max_words
            and not _starts_with_punctuation(text)
            and _alpha_ratio(text) >= min_alpha_ratio
            and not any(marker in text.lower() for marker in lowered_markers)
        ):
            kept.append(text)
    return kept


def _starts_with_punctuation(text: str) -> bool:
    return bool(text) and not text[0].isalnum()


def _alpha_ratio(text: str) -> float:
    visible = [ch for ch in text if not ch.isspace()]
    if not visible:
        return 0.0
    return sum(ch.isalpha() for ch in visible) / len(visible)
