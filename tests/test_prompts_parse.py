"""What the LLM is asked, how its answers are read, and the offline grammar source."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from selma_toolkit.dataset import read_prompts
from selma_toolkit.errors import RecipeError
from selma_toolkit.prompts import generate_prompts
from selma_toolkit.prompts.grammar import GrammarSource
from selma_toolkit.prompts.parse import parse_answer, request_text
from selma_toolkit.recipe import GrammarSettings, load_skill_recipe, skill_recipe_from_dict


def test_request_shows_the_instruction_then_the_examples_as_a_numbered_list():
    text = request_text(
        "Create {n} prompts, each under {max_words} words; keep {braces}.\nExamples:",
        ["a cat", "two dogs ", "a red car"],
        n=20,
        max_words=30,
    )
    assert (
        text
        == "Create 20 prompts, each under 30 words; keep {braces}.\nExamples:\n\n1. a cat\n2. two dogs\n3. a red car\n"
    )


def test_numbered_list_is_parsed_with_prose_bullets_quotes_and_markup_removed():
    answer = (
        "Sure! Here are five more image descriptions:\n\n"
        "4. A cat on a mat.\n"
        '5) "Two dogs under a table"\n'
        "(6) “Three birds on a wire”\n"
        "7: **A bold red kite**\n"
        "- a bulleted   prompt\n"
        "• another bullet\n"
        "A giraffe 3.5 metres tall is prose here, not an item\n"
        "8.\n"
        "\nI hope these help! Let me know if you need more."
    )
    parsed = parse_answer(answer)
    assert parsed.candidates == [
        "A cat on a mat.",
        "Two dogs under a table",
        "Three birds on a wire",
        "A bold red kite",
        "a bulleted prompt",
        "another bullet",
        "",
    ]
    assert parsed.cut_off == 0


def test_answer_cut_at_the_token_limit_drops_its_unfinished_last_item():
    parsed = parse_answer("4. A full prompt\n5. A prompt cut in the mid", truncated=True)
    assert parsed.candidates == ["A full prompt"] and parsed.cut_off == 1
    assert parse_answer(None).candidates == [] and parse_answer("no list at all").candidates == []


def test_grammar_batches_are_deterministic_from_the_seed_and_fill_distinct_words():
    grammar = GrammarSettings(
        templates=["{count} {object}s next to a {object2}"],
        words={"count": ["two", "three"], "object": ["box", "cherry", "apple"]},
    )
    batch = GrammarSource(grammar, seed=7).batch(0, 30)
    assert batch == GrammarSource(grammar, seed=7).batch(0, 30)
    assert batch != GrammarSource(grammar, seed=8).batch(0, 30)
    assert GrammarSource(grammar, seed=7).batch(1, 30) != batch
    plurals = {"box": "boxes", "cherry": "cherries", "apple": "apples"}
    for prompt in batch:
        count, first, _, _, article, second = prompt.split()
        assert count in ("two", "three") and first in plurals.values()
        singular = next(word for word, plural in plurals.items() if plural == first)
        assert second != singular  # two slots of one list get different words
        assert article == ("an" if second == "apple" else "a")


def test_grammar_skill_reaches_its_target_through_the_filters(tmp_path):
    skill = load_skill_recipe("count-grammar", ["num_prompts=30"])
    out = tmp_path / "prompts.jsonl"
    stats = generate_prompts(skill, out, heldout=5)
    assert (stats.kept, stats.added, stats.requests) == (35, 35, 0)
    train, heldout = read_prompts(out, split="train"), read_prompts(out, split="heldout")
    assert [r.id for r in train] == list(range(30)) and [r.id for r in heldout] == list(range(30, 35))
    assert sum(stats.rejected.values()) > 0  # the grammar repeats itself: the filters had work to do
    # Independent check: every kept prompt, against the seeds and every earlier one, with rouge_score.
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool = list(skill.seeds)
    for record in train + heldout:
        best = max(scorer.score(p, record.prompt)["rougeL"].fmeasure for p in pool)
        assert best <= 0.8 and record.extra["max_rouge"] == best
        assert record.extra["source"] == "grammar" and len(record.prompt.split()) <= skill.max_words
        pool.append(record.prompt)
    again = generate_prompts(skill, tmp_path / "again.jsonl", heldout=5)
    assert (tmp_path / "again.jsonl").read_text() == out.read_text() and again.kept == 35


def test_an_exhausted_grammar_stops_after_max_empty_rounds_with_what_it_kept(tmp_path):
    skill = skill_recipe_from_dict(
        {
            "name": "tiny-grammar",
            "source": "grammar",
            "seeds": ["a red cup", "a blue cup", "a green cup"],
            "num_prompts": 10,
            "llm": {"max_empty_rounds": 4},
            "grammar": {"templates": ["a {color} ball"], "words": {"color": ["red", "blue"]}},
        }
    )
    out = tmp_path / "prompts.jsonl"
    with pytest.raises(RecipeError, match=r"4 grammar batches in a row added no prompt.*2/10 prompts kept so far"):
        generate_prompts(skill, out)
    assert sorted(r.prompt for r in read_prompts(out)) == ["a blue ball", "a red ball"]
