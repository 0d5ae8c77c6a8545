"""Writes the packaged held-out suites: policies/data/instruct_checks.jsonl (`instruct-checks`,
what kaizen reports) and policies/data/gate_checks.jsonl (`gate-checks`, what the demo's gate
decides on, so no decision is ever taken on the reported items).

Every task stem below was written for kaizen (none is taken or paraphrased from a public
benchmark). Each stem gets two items with different constraint sets (1-3 constraints each,
from `policies.constraints`), drawn with a fixed seed, so re-running reproduces the file
byte for byte; tests/policies/test_suites.py checks that it does. Training prompts come from
a disjoint pool (policies/data/verifiable_tasks.json) with other seeds; the stems here open
with "Describe/Explain/Give/Write/Suggest/Compose", the gate's with "Outline/Share/Recommend/List/
Draft/Sketch", the training ones with "Tell me/How/Why/What".

    python -m ops.make_instruct_checks          # rewrite the file
    python -m ops.make_instruct_checks --check  # exit 1 if the file is stale
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from importlib import resources

from policies.constraints import render_prompt, sample_constraints

ITEMS_PER_STEM = 2
# Weights of 1, 2 and 3 constraints per item: mostly one or two, so a small model's score
# is not pinned at zero and per-kind satisfaction rates have enough items behind them.
CONSTRAINT_COUNTS = (1, 1, 2, 2, 3)

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

GATE_STEMS = (
    "Outline a plan for a rainy Sunday at home.",
    "Share some ideas for a school bake sale.",
    "Recommend a few activities for a snowy afternoon.",
    "List things to bring on a day at the beach.",
    "Draft a note asking a neighbor to feed your cat.",
    "Outline the steps for washing a car by hand.",
    "Share what you would pack for a camping night.",
    "Recommend a board game for a family evening and say why.",
    "Sketch a day in the life of a mail carrier.",
    "Draft a short speech for a friend's farewell party.",
    "Outline how to get ready for a music exam.",
    "Share some tips for keeping houseplants green.",
    "Recommend a few easy breakfasts for busy mornings.",
    "List ways to make a small bedroom feel bigger.",
    "Draft a message reminding a team about a deadline.",
    "Outline how to organize a bookshelf.",
    "Share your thoughts on why people collect stamps.",
    "Recommend some habits for a calmer evening.",
    "Sketch a scene at a busy airport.",
    "Draft an ad for a used bicycle.",
    "Outline how to teach a dog to sit.",
    "Share some ideas for a birthday gift for a grandparent.",
    "Recommend ways to spend less time on a phone.",
    "List the good points of living near a park.",
    "Draft a welcome note for a new club member.",
    "Outline how to make a paper lantern.",
    "Share what makes a cozy cafe inviting.",
    "Recommend a simple routine for stretching after work.",
    "Sketch a harbor at dawn.",
    "Draft a thank-you message for a birthday present.",
    "Outline the steps to repot a small plant.",
    "Share some ways to celebrate a friend's success.",
    "Recommend a few quiet places to study in a town.",
    "List reasons a person might learn to swim.",
    "Draft a notice about a lost set of keys.",
    "Outline how to plan a simple dinner party.",
    "Share some tips for a first visit to a zoo.",
    "Recommend ways to keep a kitchen free of clutter.",
    "Sketch an old bookshop on a side street.",
    "Draft a reply accepting an invitation to a wedding.",
    "Outline how to build a small snowman.",
    "Share some reasons people write letters by hand.",
    "Recommend a few games to play on a long train ride.",
    "List what a good first aid kit should contain.",
    "Draft a short note for a classmate who is sick.",
    "Outline how to set up a tent in a field.",
    "Share some ideas for decorating a classroom.",
    "Recommend ways to make a morning walk more fun.",
    "Sketch a village festival in summer.",
    "Draft a message asking a landlord to fix a leaking tap.",
    "Outline how to brew coffee with a simple filter.",
    "Share why people like watching the stars.",
    "Recommend some ways to meet new neighbors.",
    "List some chores children can help with at home.",
    "Draft a greeting for the first page of a travel diary.",
    "Outline a weekly plan for cleaning a small flat.",
    "Share some tips for painting a wall evenly.",
    "Recommend a few snacks for a movie night.",
    "Sketch a playground after a summer storm.",
    "Draft a toast for a couple's anniversary dinner.",
    "Outline how to prepare a bike for winter.",
    "Share some ways to brighten a gloomy office.",
    "Recommend a few picture books for a five-year-old.",
    "List what to check before leaving for a holiday.",
    "Draft an email asking a coworker to swap shifts.",
    "Sketch a bakery just before it opens.",
    "Outline how to host a quiz evening for friends.",
    "Share some ideas for a rainy day at school.",
    "Recommend ways to keep cool in a heat wave.",
    "List some uses for a spare wooden crate.",
    "Draft a note to a teacher about a missed homework.",
    "Sketch a windmill on a hill at noon.",
    "Outline how to start learning the guitar.",
    "Share what you like about autumn evenings.",
    "Recommend some ways to relax after a long flight.",
    "List things a new puppy needs.",
    "Draft a short review of a walking trail.",
    "Sketch a city rooftop at night.",
    "Outline how to label boxes before moving house.",
    "Share some tips for taking better photos with a phone.",
    "Recommend a few ways to use leftover rice.",
    "List some signs that a tire needs air.",
    "Draft a message inviting a colleague to lunch.",
    "Sketch a market stall selling spices.",
    "Outline how to plan a school science fair project.",
    "Share why some people enjoy getting up early.",
    "Recommend ways to make a long meeting shorter.",
    "List what to pack in a school lunch box.",
    "Draft a notice about a change in library hours.",
    "Sketch a garden after the first frost.",
    "Outline how to give a dog a bath at home.",
    "Share some ideas for a family photo album.",
    "Recommend a few exercises for a stiff neck.",
    "List some ways to reuse cardboard boxes.",
    "Draft a request for a day off from work.",
    "Sketch a ferry crossing on a windy day.",
    "Outline a weekly budget for a student.",
    "Share what makes a good neighborhood bakery.",
    "Recommend some ways to learn the names of birds.",
    "List what a hiker should carry on a mountain path.",
    "Draft a caption for a photo of a sunset.",
    "Sketch a kitchen on a holiday morning.",
    "Outline how to sew a loose button back on.",
    "Share some ways to keep a garage tidy.",
    "Recommend a few hobbies that need only paper and pencil.",
    "List some reasons to take up gardening.",
    "Draft a short message asking for a restaurant booking.",
    "Sketch a park bench in the middle of winter.",
    "Outline how to prepare a room for a guest.",
    "Share some ideas for a neighborhood clean-up day.",
    "Recommend some ways to practise mental arithmetic.",
    "List things that make a bedroom good for sleep.",
    "Draft a reminder about a dentist appointment.",
    "Sketch a desert road at midday.",
    "Outline how to feed birds in a back garden.",
    "Share some ways to make a commute more pleasant.",
    "Recommend a few ways to spend a free afternoon in a city.",
    "List some chores that are best done on a sunny day.",
    "Draft a note thanking a nurse for their care.",
    "Sketch a school hallway just after the last bell.",
)


@dataclass(frozen=True)
class PackagedSuite:
    resource: str
    stems: tuple[str, ...]
    seed: str
    id_prefix: str


PACKAGED = (
    PackagedSuite("data/instruct_checks.jsonl", EVAL_STEMS, "kaizen/instruct-checks/v1", "ic"),
    PackagedSuite("data/gate_checks.jsonl", GATE_STEMS, "kaizen/gate-checks/v1", "gc"),
)


def build_items(suite: PackagedSuite = PACKAGED[0]) -> list[dict]:
    """The suite's items, in file order."""
    rng = random.Random(suite.seed)
    items: list[dict] = []
    for stem_index, stem in enumerate(suite.stems):
        used: set[frozenset] = set()
        while len(used) < ITEMS_PER_STEM:
            constraints = sample_constraints(rng, rng.choice(CONSTRAINT_COUNTS), task=stem)
            kinds = frozenset(c.kind for c in constraints)
            if kinds in used:
                continue
            used.add(kinds)
            items.append(
                {
                    "id": f"{suite.id_prefix}-{stem_index + 1:03d}-{len(used)}",
                    "prompt": render_prompt(stem, constraints),
                    "task": stem,
                    "constraints": [c.to_json() for c in constraints],
                }
            )
    return items


def render_jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items)


def main(argv: list[str]) -> int:
    stale = False
    for suite in PACKAGED:
        target = resources.files("policies").joinpath(suite.resource)
        text = render_jsonl(build_items(suite))
        if "--check" in argv:
            differs = target.read_text(encoding="utf-8") != text
            stale = stale or differs
            print(f"{suite.resource}: {'stale, run python -m ops.make_instruct_checks' if differs else 'up to date'}")
            continue
        with resources.as_file(target) as path:
            path.write_text(text, encoding="utf-8")
        print(f"wrote {len(text.splitlines())} items to {suite.resource}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
