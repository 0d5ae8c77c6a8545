"""Writes policies/data/instruct_checks.jsonl, the held-out `instruct-checks` suite.

Every task stem below was written for kaizen (none is taken or paraphrased from a public
benchmark). Each stem gets two items with different constraint sets (1-3 constraints each,
from `policies.constraints`), drawn with a fixed seed, so re-running reproduces the file
byte for byte; tests/policies/test_suites.py checks that it does. Training prompts come from
a disjoint pool (policies/data/verifiable_tasks.json) with other seeds; the stems here open
with "Describe/Explain/Give/Write/Suggest/Compose", the training ones with "Tell me/How/Why/What".

    python -m ops.make_instruct_checks          # rewrite the file
    python -m ops.make_instruct_checks --check  # exit 1 if the file is stale
"""

from __future__ import annotations

import json
import random
import sys
from importlib import resources

from policies.constraints import render_prompt, sample_constraints

SUITE_SEED = "kaizen/instruct-checks/v1"
ITEMS_PER_STEM = 2
# Weights of 1, 2 and 3 constraints per item: mostly one or two, so a small model's score
# is not pinned at zero and per-kind satisfaction rates have enough items behind them.
CONSTRAINT_COUNTS = (1, 1, 2, 2, 3)
RESOURCE = "data/instruct_checks.jsonl"

EVAL_STEMS = (
    "Describe your ideal weekend morning.",
    "Explain why people should drink enough water.",
    "Give advice to someone starting their first job.",
    "Describe how to make a cup of tea.",
    "Explain what a rainbow is.",
    "Describe the benefits of walking every day.",
    "Write a note thanking a neighbor for watering your plants.",
    "Explain how to tie a shoelace.",
    "Describe the sound of rain on a roof.",
    "Give tips for sleeping better at night.",
    "Explain why recycling matters.",
    "Write a birthday message for a coworker.",
    "Describe a busy market on a Saturday.",
    "Explain how bees make honey.",
    "Suggest a name for a pet turtle and explain your choice.",
    "Describe what makes a good friend.",
    "Explain how to plant a seed in a pot.",
    "Write a review of an imaginary pizza restaurant.",
    "Explain why the ocean is salty.",
    "Give advice for a long car trip with kids.",
    "Describe the view from a mountain top.",
    "Explain how a bicycle works.",
    "Write an invitation to a picnic in the park.",
    "Explain why the Earth has seasons.",
    "Describe your favorite kind of weather.",
    "Give tips for learning a new language.",
    "Explain how to save money on groceries.",
    "Write a story about a lost umbrella.",
    "Describe how to clean a kitchen quickly.",
    "Explain what a public library is for.",
    "Give reasons to read books for fun.",
    "Describe a cat waking up from a nap.",
    "Explain how to fold a paper airplane.",
    "Write a message apologizing for missing a meeting.",
    "Explain why exercise can improve your mood.",
    "Describe the perfect sandwich.",
    "Give advice on packing a suitcase.",
    "Explain what clouds are made of.",
    "Write a speech welcoming new students to a school.",
    "Describe how fresh snow feels under your boots.",
    "Explain why some leaves turn red in autumn.",
    "Give tips for keeping a desk tidy.",
    "Explain how to boil an egg.",
    "Write a postcard from a seaside town.",
    "Describe the job of a firefighter.",
    "Explain why sleep is important for students.",
    "Suggest some hobbies for a quiet evening.",
    "Explain how a refrigerator keeps food cold.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to your future self.",
    "Explain how to care for a goldfish.",
    "Give advice for the first day at a new school.",
    "Describe what a lighthouse does.",
    "Explain why people enjoy music.",
    "Write a product description for a reusable water bottle.",
    "Describe a game children play outside.",
    "Explain how to make a simple salad.",
    "Give tips for always being on time.",
    "Explain what a volcano is.",
    "Write an encouraging message for a friend running a race.",
    "Describe the smell of fresh bread.",
    "Explain how to wash your hands properly.",
    "Give reasons to visit a museum.",
    "Describe a train station late at night.",
    "Explain why the moon seems to change shape.",
    "Write an announcement that the office will close early on Friday.",
    "Describe how to set a table for dinner.",
    "Explain what makes a good teacher.",
    "Give advice for staying calm before a test.",
    "Explain how plants get energy from sunlight.",
    "Describe a snowy village.",
    "Write a thank-you note to a teacher.",
    "Explain how to fold a shirt neatly.",
    "Give tips for a picnic on a hot day.",
    "Explain why many bridges are built with arches.",
    "Describe your dream house.",
    "Explain how to start a vegetable garden.",
    "Write a description of a friendly robot.",
    "Give advice to someone who wants to jog every morning.",
    "Explain how borrowing books with a library card works.",
    "Describe the first snowfall of winter.",
    "Explain why people keep dogs as pets.",
    "Write a message inviting friends to watch a movie.",
    "Explain what a map is used for.",
    "Give tips for writing neat handwriting.",
    "Describe a lake at sunrise.",
    "Explain how to make lemonade.",
    "Explain why eating vegetables is good for you.",
    "Write a poster asking for help finding a lost cat.",
    "Describe the work of a baker.",
    "Explain how to choose a good book.",
    "Give advice for making friends in a new city.",
    "Explain how wind forms.",
    "Describe a birthday party for a young child.",
    "Compose a few lines of verse about a rainy afternoon.",
    "Explain how to keep a plant alive indoors.",
    "Describe a crowded beach in summer.",
    "Explain why people wear seat belts.",
    "Give tips for a job interview.",
    "Explain what a calendar is for.",
    "Describe how it feels to finish a long book.",
    "Write a note to a roommate about buying groceries.",
    "Explain why the sun rises in the east.",
    "Give advice for keeping a journal.",
    "Describe an old clock tower.",
    "Explain how a kite flies.",
    "Write a welcome message for visitors to a small town.",
    "Explain why friendship is important.",
    "Describe a quiet library on a rainy day.",
    "Give tips for cooking pasta.",
    "Explain how to look after leather shoes.",
    "Describe a street musician playing in the rain.",
    "Explain why people celebrate the new year.",
    "Write a short bio for a friendly dentist.",
    "Give advice for saving energy at home.",
    "Explain how to make a bed neatly.",
    "Describe the taste of a ripe mango.",
    "Explain what a good habit is.",
    "Write a message congratulating a friend on a new baby.",
    "Describe a farm in the early morning.",
)


def build_items() -> list[dict]:
    """The suite's items, in file order."""
    rng = random.Random(SUITE_SEED)
    items: list[dict] = []
    for stem_index, stem in enumerate(EVAL_STEMS):
        used: set[frozenset] = set()
        while len(used) < ITEMS_PER_STEM:
            constraints = sample_constraints(rng, rng.choice(CONSTRAINT_COUNTS), task=stem)
            kinds = frozenset(c.kind for c in constraints)
            if kinds in used:
                continue
            used.add(kinds)
            items.append(
                {
                    "id": f"ic-{stem_index + 1:03d}-{len(used)}",
                    "prompt": render_prompt(stem, constraints),
                    "task": stem,
                    "constraints": [c.to_json() for c in constraints],
                }
            )
    return items


def render_jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items)


def main(argv: list[str]) -> int:
    target = resources.files("policies").joinpath(RESOURCE)
    text = render_jsonl(build_items())
    if "--check" in argv:
        stale = target.read_text(encoding="utf-8") != text
        print(f"{RESOURCE}: {'stale, run python -m ops.make_instruct_checks' if stale else 'up to date'}")
        return 1 if stale else 0
    with resources.as_file(target) as path:
        path.write_text(text, encoding="utf-8")
    print(f"wrote {len(text.splitlines())} items to {RESOURCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
