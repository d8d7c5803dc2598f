"""Benchmark: DSG-style question scoring batched versus one question at a time, on a tiny VQA judge.

The real ``questions`` scorer (selma_toolkit.evaluate.vqa, answered by an image-text-to-text model
through selma_toolkit.evaluate.vlm) scores the same images and questions twice per round: once with
``batch_size = --batch`` (every image's questions in shared forward passes) and once with
``batch_size = 1`` (one forward pass per question). Model loading is excluded (the model is loaded
before the rounds and shared by both, as a judge is within one process). Both runs must choose the
same answers; the script exits 1 if they do not. The median of the rounds' ratios is reported, so
load from other programs on a shared machine weighs on both sides of a ratio alike. Prints as its
last line ``judge_batch ratio=R goal=>=3`` where R = (questions/s batched) / (questions/s one at a time).

    python bench/judge.py [--model tiny:paligemma] [--images 16] [--questions 8] [--batch 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from selma_toolkit.evaluate import build_scorer
from selma_toolkit.recipe import EvaluateSettings

GOAL = 3.0
OBJECTS = ["cube", "ball", "dog", "cat", "car", "tree", "cup", "box"]
COLORS = ["red", "blue", "green", "yellow"]


def question_file(path: Path, prompts: int, questions: int) -> list[str]:
    """A DSG-style question file: per prompt an entity question, then attribute questions depending on it."""
    rows, texts = [], []
    for p in range(prompts):
        thing, color = OBJECTS[p % len(OBJECTS)], COLORS[p % len(COLORS)]
        text = f"a {color} {thing} number {p}"
        texts.append(text)
        rows.append({"prompt": text, "question_id": 1, "question": f"is there a {thing}?"})
        for q in range(2, questions + 1):
            other = COLORS[(p + q) % len(COLORS)]
            rows.append({"prompt": text, "question_id": q, "question": f"is the {thing} {other}?", "dependency": "1"})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return texts


def picture(seed: int) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
    ImageDraw.Draw(image).rectangle([8, 8, 40, 40], fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny:paligemma", help="the VQA judge (evaluate.vqa_model)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--questions", type=int, default=8, help="questions per image")
    parser.add_argument("--batch", type=int, default=32, help="(image, question) pairs per forward pass, batched")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "questions.jsonl"
        prompts = question_file(path, args.images, args.questions)
        images = [picture(i) for i in range(args.images)]
        scorers = {
            size: build_scorer(
                "questions",
                EvaluateSettings(scorers=["questions"], questions=str(path), vqa_model=args.model, batch_size=size),
                "cpu",
            )
            for size in (args.batch, 1)
        }
        scorers[1].answers(images[0], scorers[1].questions.for_prompt(prompts[0]))  # loads the shared model
        asked = args.images * args.questions
        ratios = []
        for round_index in range(args.rounds):
            rates, answers = {}, {}
            for size, scorer in scorers.items():
                start = time.perf_counter()
                answers[size] = scorer.answer_many(images, [scorer.questions.for_prompt(p) for p in prompts])
                rates[size] = asked / (time.perf_counter() - start)
            if answers[args.batch] != answers[1]:
                print("broken: batched scoring chose other answers than one question at a time", file=sys.stderr)
                return 1
            ratios.append(rates[args.batch] / rates[1])
            print(
                f"round {round_index + 1}: one at a time {rates[1]:.1f} questions/s, batch {args.batch} "
                f"{rates[args.batch]:.1f} questions/s, ratio {ratios[-1]:.2f}",
                file=sys.stderr,
            )
    print(f"judge_batch ratio={statistics.median(ratios):.2f} goal=>={GOAL:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
