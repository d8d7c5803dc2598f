"""Benchmark: ROUGE-L de-duplication of a 5,000-prompt stream, ours vs the plain rouge-score loop.

The stream is a fixed corpus generated here (seeded): prompts from sentence patterns and word
lists, about a third of them near-duplicates of earlier ones (a word changed, dropped or added,
case and punctuation changed) and a few exact repeats. Each prompt is compared with every prompt
kept before it; it is kept when no score is above 0.8 (Self-Instruct / Alpaca / SELMA).

Both filters run in this process: ours (selma_toolkit.prompts.rouge.RougeFilter) over the whole
stream; the straightforward loop (``RougeScorer(["rougeL"]).score`` against every kept prompt)
over a prefix only, because the whole stream takes it about 10 minutes. Its time for the whole
stream is extrapolated from the prefix by the number of pairs scored, and the output says so.
Decisions and maximum scores must be identical on the prefix, or the script exits 1.

    python bench/rouge_filter.py [--prompts 5000] [--prefix 1000]

Last line: ``rouge_filter ratio=R goal=>=50``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from rouge_score import rouge_scorer

from selma_toolkit.prompts.rouge import RougeFilter

THRESHOLD = 0.8
GOAL = 50

SUBJECTS = [
    "dog",
    "cat",
    "horse",
    "cow",
    "sheep",
    "goat",
    "rabbit",
    "fox",
    "bear",
    "deer",
    "owl",
    "eagle",
    "parrot",
    "duck",
    "swan",
    "penguin",
    "turtle",
    "frog",
    "lizard",
    "snake",
    "elephant",
    "giraffe",
    "zebra",
    "lion",
    "tiger",
    "monkey",
    "panda",
    "koala",
    "kangaroo",
    "whale",
    "dolphin",
    "woman",
    "man",
    "girl",
    "boy",
    "child",
    "baby",
    "chef",
    "doctor",
    "farmer",
    "painter",
    "musician",
    "dancer",
    "soldier",
    "student",
    "teacher",
    "police",
    "officer",
    "firefighter",
    "pilot",
    "sailor",
    "astronaut",
    "robot",
    "knight",
    "wizard",
    "clown",
    "car",
    "bicycle",
    "motorcycle",
    "bus",
    "train",
    "truck",
    "boat",
    "airplane",
    "kite",
    "balloon",
    "lamp",
    "chair",
    "table",
    "sofa",
    "bed",
    "clock",
    "vase",
    "teapot",
    "cup",
    "mug",
    "bottle",
    "guitar",
    "piano",
    "violin",
    "drum",
    "umbrella",
    "backpack",
    "suitcase",
    "hat",
    "shoe",
    "sock",
    "glove",
    "scarf",
]
ADJECTIVES = [
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
    "golden",
    "silver",
    "wooden",
    "metal",
    "glass",
    "plastic",
    "stone",
    "paper",
    "leather",
    "woolen",
    "tiny",
    "small",
    "big",
    "huge",
    "tall",
    "short",
    "old",
    "young",
    "ancient",
    "modern",
    "shiny",
    "rusty",
    "dusty",
    "wet",
    "dry",
    "fluffy",
    "furry",
    "striped",
    "spotted",
    "checkered",
    "broken",
    "new",
    "happy",
    "sad",
    "sleepy",
    "angry",
    "curious",
]
VERBS = [
    "sitting",
    "standing",
    "lying",
    "sleeping",
    "running",
    "jumping",
    "walking",
    "flying",
    "swimming",
    "eating",
    "drinking",
    "reading",
    "writing",
    "painting",
    "playing",
    "holding",
    "carrying",
    "pushing",
    "pulling",
    "watching",
    "chasing",
    "climbing",
    "riding",
    "hiding",
    "dancing",
    "singing",
    "cooking",
]
PLACES = [
    "kitchen",
    "garden",
    "park",
    "beach",
    "forest",
    "desert",
    "mountain",
    "river",
    "lake",
    "street",
    "city",
    "square",
    "market",
    "library",
    "classroom",
    "office",
    "bedroom",
    "bathroom",
    "living",
    "room",
    "attic",
    "basement",
    "rooftop",
    "bridge",
    "tunnel",
    "harbor",
    "farm",
    "field",
    "meadow",
    "snowfield",
    "jungle",
    "cave",
    "castle",
    "temple",
    "museum",
    "station",
    "airport",
    "stadium",
]
RELATIONS = [
    "next to",
    "on top of",
    "under",
    "behind",
    "in front of",
    "to the left of",
    "to the right of",
    "beside",
    "above",
    "below",
    "inside",
    "near",
]
COUNTS = ["two", "three", "four", "five", "a pair of", "several", "many"]
STYLES = [
    "oil painting",
    "watercolor",
    "pencil sketch",
    "photograph",
    "3d render",
    "pixel art",
    "anime style",
    "studio lighting",
    "cinematic",
    "hyperrealistic",
    "low poly",
    "ukiyo-e",
]
PATTERNS = [
    "A {adj} {subj} {verb} in the {place}.",
    "{Count} {adj} {subj}s {verb} {rel} a {adj2} {subj2}.",
    "A photo of a {subj} {rel} a {subj2} in a {adj} {place}.",
    "The {adj} {subj} is {verb} {rel} the {adj2} {subj2} while a {subj3} watches.",
    "{adj} {subj} {verb} on a {adj2} {subj2}, {style}, {style2}",
    "An {style} of a {adj} {subj} and a {adj2} {subj2} {verb} together near the {place}.",
    "In this image we can see a {subj} {verb} and behind it there is a {adj} {subj2} and a {place}.",
    "{Count} {subj}s and {count2} {subj2}s on a {adj} table.",
    "A close-up of a {adj} {subj} with a {adj2} {subj2} {rel} it, {style}.",
    "Someone {verb} a {adj} {subj} in a crowded {place} during a rainy {adj2} evening.",
    "A {subj} wearing a {adj} {subj2} is {verb} at the {place}, highly detailed, {style}",
    "portrait of a {adj} {subj} by a {adj2} window, {style}, {style2}, trending on artstation",
]


def _fill(pattern: str, rng: random.Random) -> str:
    values = {
        "adj": rng.choice(ADJECTIVES),
        "adj2": rng.choice(ADJECTIVES),
        "subj": rng.choice(SUBJECTS),
        "subj2": rng.choice(SUBJECTS),
        "subj3": rng.choice(SUBJECTS),
        "verb": rng.choice(VERBS),
        "place": rng.choice(PLACES),
        "rel": rng.choice(RELATIONS),
        "count": rng.choice(COUNTS),
        "count2": rng.choice(COUNTS),
        "style": rng.choice(STYLES),
        "style2": rng.choice(STYLES),
    }
    values["Count"] = values["count"].capitalize()
    text = pattern.format(**values)
    return text[0].upper() + text[1:]


def _near_duplicate(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(rng.randint(1, 3)):
        edit = rng.random()
        if edit < 0.3 and len(words) > 3:
            words.pop(rng.randrange(len(words)))
        elif edit < 0.6:
            words.insert(rng.randrange(len(words) + 1), rng.choice(ADJECTIVES))
        elif edit < 0.85:
            words[rng.randrange(len(words))] = rng.choice(SUBJECTS + VERBS)
        else:
            words = [w.upper() if rng.random() < 0.2 else w.strip(".,") for w in words]
    return " ".join(words)


def make_corpus(size: int, seed: int = 0) -> list[str]:
    """The fixed stream: fresh prompts, near-duplicates of earlier ones (~1/3) and exact repeats."""
    rng = random.Random(seed)
    corpus: list[str] = []
    for _ in range(size):
        roll = rng.random()
        if corpus and roll < 0.03:
            corpus.append(rng.choice(corpus))
        elif corpus and roll < 0.35:
            corpus.append(_near_duplicate(rng.choice(corpus), rng))
        else:
            corpus.append(_fill(rng.choice(PATTERNS), rng))
    return corpus


def run_ours(corpus: list[str]) -> tuple[list[tuple[bool, float]], list[int], float]:
    """Decisions (similar, max score), pool size before each prompt, seconds."""
    start = time.perf_counter()
    rouge = RougeFilter(THRESHOLD)
    decisions, pool_sizes = [], []
    for text in corpus:
        pool_sizes.append(len(rouge))
        check = rouge.check(text)
        decisions.append((check.similar, check.max_score))
        if not check.similar:
            rouge.add(text)
    return decisions, pool_sizes, time.perf_counter() - start


def run_plain_loop(corpus: list[str]) -> tuple[list[tuple[bool, float]], float]:
    """The straightforward loop: score the candidate against every kept prompt with rouge-score."""
    start = time.perf_counter()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept: list[str] = []
    decisions = []
    for text in corpus:
        best = max((scorer.score(prompt, text)["rougeL"].fmeasure for prompt in kept), default=0.0)
        decisions.append((best > THRESHOLD, best))
        if best <= THRESHOLD:
            kept.append(text)
    return decisions, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=5000)
    parser.add_argument("--prefix", type=int, default=1000, help="prompts the plain loop runs on (>= 1000)")
    args = parser.parse_args()

    corpus = make_corpus(args.prompts)
    prefix = min(args.prefix, len(corpus))
    ours, pool_sizes, ours_seconds = run_ours(corpus)
    plain, plain_seconds = run_plain_loop(corpus[:prefix])

    mismatches = [i for i in range(prefix) if ours[i] != plain[i]]
    kept = sum(1 for similar, _ in ours if not similar)
    pairs_all, pairs_prefix = sum(pool_sizes), sum(pool_sizes[:prefix])
    plain_all = plain_seconds * pairs_all / pairs_prefix
    print(f"stream: {len(corpus)} prompts, {kept} kept, {len(corpus) - kept} rejected, {pairs_all:,} pairs")
    print(f"ours: {ours_seconds:.2f} s for the whole stream")
    print(
        f"plain rouge-score loop: {plain_seconds:.1f} s for the first {prefix} prompts ({pairs_prefix:,} pairs); "
        f"extrapolated by pair count to the whole stream: {plain_all:.0f} s"
    )
    if mismatches:
        first = mismatches[0]
        print(
            f"BROKEN: {len(mismatches)} decisions differ on the prefix, first at #{first}: "
            f"ours {ours[first]} vs rouge-score {plain[first]} for {corpus[first]!r}"
        )
        return 1
    print(f"decisions and maximum scores identical on the {prefix} prompts both ran")
    print(f"rouge_filter ratio={plain_all / ours_seconds:.1f} goal=>={GOAL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
