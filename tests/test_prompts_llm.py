"""Stage 1 against a scripted LLM (a real HTTP server on 127.0.0.1, the real openai SDK)."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer
from support_llm import Close, Fail, Hang, Reply, examples_in, prompt_of, skill_data

from selma_toolkit.dataset import read_prompts
from selma_toolkit.errors import DatasetError, EndpointError, RecipeError
from selma_toolkit.io import read_jsonl
from selma_toolkit.prompts import generate_prompts
from selma_toolkit.recipe import skill_recipe_from_dict

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def skill(server, **changes):
    return skill_recipe_from_dict(skill_data(server.url, **changes))


def test_completions_endpoint_reaches_the_target_and_counts_each_rejection(scripted_llm, tmp_path):
    scripted_llm.then(
        Reply(
            "4. A red fox jumps over a sleeping dog in the snow\n"  # the list continues after the 3 examples
            "5.\n"
            "6. " + "word " * 31 + "\n"
            "7. a red FOX jumps over a  sleeping dog in the snow\n"
            "8. A red fox jumps over a sleeping dog in the deep snow\n"
            "9. Dogs stick their heads out of car windows.\n"
            "10. Three glass bottles on a windowsill at noon"
        ),
        Reply(
            "4. Three glass bottles on a windowsill at noon!\n5. An old man feeding pigeons in a rainy square\n"
            "6. A yellow submarine under a frozen lake\n7. A violin leaning on a pia",
            finish_reason="length",
        ),
    )
    out = tmp_path / "prompts.jsonl"
    recipe = skill(scripted_llm, num_prompts=4, llm={"concurrency": 1})
    stats = generate_prompts(recipe, out, cache_dir=tmp_path / "cache")

    records = read_prompts(out)
    assert [r.prompt for r in records] == [
        "A red fox jumps over a sleeping dog in the snow",
        "Three glass bottles on a windowsill at noon",
        "An old man feeding pigeons in a rainy square",
        "A yellow submarine under a frozen lake",
    ]
    assert stats.rejected == {"empty": 1, "too_long": 1, "duplicate": 2, "similar": 2, "cut_off": 1}
    assert (stats.kept, stats.requests, len(scripted_llm.requests)) == (4, 2, 2)
    assert stats.prompt_tokens > 0 and stats.completion_tokens > 0
    pool = list(recipe.seeds)
    for record in records:  # max_rouge is rouge_score's maximum against the pool at acceptance
        assert record.extra["max_rouge"] == max(SCORER.score(p, record.prompt)["rougeL"].fmeasure for p in pool)
        assert record.extra["request_id"].startswith("req-") and record.extra["source"] == "llm"
        pool.append(record.prompt)


def test_chat_answers_with_prose_around_the_list_give_only_the_listed_prompts(scripted_llm, tmp_path):
    out = tmp_path / "prompts.jsonl"
    stats = generate_prompts(skill(scripted_llm, llm={"api": "chat"}), out, heldout=3, cache_dir=tmp_path / "cache")
    assert stats.kept == 15
    assert all(r.path == "/v1/chat/completions" and "messages" in r.body for r in scripted_llm.requests)
    prompts = [r.prompt for r in read_prompts(out)]
    assert not any("Sure" in p or "Let me know" in p for p in prompts)
    assert [r.split for r in read_prompts(out)] == ["train"] * 12 + ["heldout"] * 3


def test_each_request_shows_examples_sampled_from_the_growing_pool_reproducibly(scripted_llm, tmp_path):
    recipe = skill(scripted_llm, num_prompts=25, llm={"concurrency": 1})  # one at a time: arrival order = request order
    generate_prompts(recipe, tmp_path / "a.jsonl", cache_dir=tmp_path / "cache-a")
    kept = read_jsonl(tmp_path / "a.jsonl")
    bodies = [r.body for r in scripted_llm.requests]
    for index, body in enumerate(bodies):
        body_examples = examples_in(prompt_of(body))
        assert len(body_examples) == 3 == len(set(body_examples))
        # Request i may show the seeds and the prompts kept from answers before it.
        visible = set(recipe.seeds) | {r["prompt"] for r in kept if r["request"] < index}
        assert set(body_examples) <= visible
        assert body["temperature"] == 1.0 and body["top_p"] == 1.0 and body["max_tokens"] == 3072
    assert any(set(examples_in(prompt_of(b))) - set(recipe.seeds) for b in bodies)  # accepted prompts are shown
    # The same recipe samples the same examples: a second run (fresh cache) sends the same requests.
    generate_prompts(recipe, tmp_path / "b.jsonl", cache_dir=tmp_path / "cache-b")
    assert [r.body for r in scripted_llm.requests[len(bodies) :]] == bodies


def test_several_requests_are_in_flight_at_once(tmp_path):
    from support_llm import ScriptedLLM

    server = ScriptedLLM(delay=0.3).start()
    try:
        generate_prompts(skill(server, llm={"concurrency": 3}), tmp_path / "p.jsonl", cache_dir=tmp_path / "cache")
    finally:
        server.stop()
    assert server.max_in_flight >= 2


def test_429_is_retried_after_the_retry_after_delay(scripted_llm, tmp_path):
    scripted_llm.then(Fail(429, {"Retry-After": "1.2"}))
    stats = generate_prompts(
        skill(scripted_llm, llm={"concurrency": 1}), tmp_path / "p.jsonl", cache_dir=tmp_path / "c"
    )
    assert stats.kept == 12
    first, retry = scripted_llm.requests[:2]
    assert retry.body == first.body
    # A lower bound only (the SDK's own backoff would wait at most 0.5 s): it cannot flake on a slow machine.
    assert retry.at - first.at >= 1.1


def test_server_errors_and_a_hang_past_the_timeout_are_retried_and_the_run_completes(scripted_llm, tmp_path):
    scripted_llm.then(Fail(500), Hang(5.0))
    recipe = skill(scripted_llm, llm={"concurrency": 1, "timeout": 0.5, "max_retries": 2})
    stats = generate_prompts(recipe, tmp_path / "p.jsonl", cache_dir=tmp_path / "c")
    assert stats.kept == 12 and stats.requests == len(scripted_llm.requests) - 2
    assert scripted_llm.requests[0].body == scripted_llm.requests[2].body  # one request, two retries


def test_rerun_into_a_new_folder_hits_the_cache_and_sends_nothing(scripted_llm, tmp_path):
    recipe = skill(scripted_llm)
    first = generate_prompts(recipe, tmp_path / "one.jsonl", heldout=2, cache_dir=tmp_path / "cache")
    sent = len(scripted_llm.requests)
    second = generate_prompts(recipe, tmp_path / "two.jsonl", heldout=2, cache_dir=tmp_path / "cache")
    assert len(scripted_llm.requests) == sent and first.requests > 0
    assert (second.requests, second.cache_hits, second.total_tokens) == (0, first.requests, 0)
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    finished = generate_prompts(recipe, tmp_path / "two.jsonl", heldout=2, cache_dir=tmp_path / "other-cache")
    assert (finished.added, finished.cache_hits, len(scripted_llm.requests)) == (0, 0, sent)


def test_missing_api_key_fails_before_any_request(scripted_llm, tmp_path, monkeypatch):
    monkeypatch.delenv("SELMA_TEST_LLM_KEY", raising=False)
    with pytest.raises(EndpointError, match=r"SELMA_TEST_LLM_KEY is not set.*api_key_required"):
        generate_prompts(
            skill(scripted_llm, llm={"api_key_required": True}), tmp_path / "p.jsonl", cache_dir=tmp_path / "c"
        )
    assert scripted_llm.requests == [] and not (tmp_path / "p.jsonl").exists()


def test_refused_key_error_names_the_variable_and_never_the_key(scripted_llm, tmp_path, monkeypatch):
    monkeypatch.setenv("SELMA_TEST_LLM_KEY", "sk-marker-refused-0123")
    scripted_llm.then(Fail(401))
    with pytest.raises(EndpointError, match="refused the API key from .SELMA_TEST_LLM_KEY") as error:
        generate_prompts(skill(scripted_llm, llm={"concurrency": 1}), tmp_path / "p.jsonl", cache_dir=tmp_path / "c")
    assert "sk-marker-refused-0123" not in str(error.value)
    assert scripted_llm.requests[0].authorization == "Bearer sk-marker-refused-0123"


def test_unreachable_endpoint_fails_after_bounded_retries_keeping_what_was_kept(scripted_llm, tmp_path):
    scripted_llm.then(Reply("4. A kettle whistling on a camping stove\n5. Two owls asleep in a barn"), Close())
    out = tmp_path / "p.jsonl"
    with pytest.raises(EndpointError, match=r"cannot reach .* after 1 retries.*2/12 prompts kept so far are saved"):
        generate_prompts(skill(scripted_llm, llm={"concurrency": 1, "max_retries": 1}), out, cache_dir=tmp_path / "c")
    assert [r.prompt for r in read_prompts(out)] == [
        "A kettle whistling on a camping stove",
        "Two owls asleep in a barn",
    ]


def test_endpoint_answering_garbage_stops_after_max_empty_rounds(tmp_path):
    from support_llm import ScriptedLLM

    server = ScriptedLLM(answer=lambda body: "I'm sorry, but I cannot help with that request.").start()
    try:
        with pytest.raises(EndpointError, match=r"3 answers in a row .* added no usable prompt .*max_empty_rounds = 3"):
            generate_prompts(skill(server, llm={"max_empty_rounds": 3}), tmp_path / "p.jsonl", cache_dir=tmp_path / "c")
    finally:
        server.stop()
    assert 3 <= len(server.requests) <= 3 + 2  # the empty rounds plus at most the requests in flight


def test_request_budget_stops_with_a_clear_message_and_a_rerun_continues(scripted_llm, tmp_path):
    out = tmp_path / "p.jsonl"
    with pytest.raises(EndpointError, match=r"llm.max_requests = 2 .* prompts kept so far are saved"):
        generate_prompts(skill(scripted_llm, num_prompts=20, llm={"max_requests": 2}), out, cache_dir=tmp_path / "c")
    assert len(scripted_llm.requests) == 2
    kept_before = [r.prompt for r in read_prompts(out)]
    stats = generate_prompts(skill(scripted_llm, num_prompts=20), out, cache_dir=tmp_path / "c")
    records = read_prompts(out)
    assert stats.kept == 20 and [r.id for r in records] == list(range(20))
    assert [r.prompt for r in records[: len(kept_before)]] == kept_before
    with pytest.raises(EndpointError, match=r"llm.max_total_tokens = 1 tokens"):
        generate_prompts(
            skill(scripted_llm, num_prompts=40, llm={"max_total_tokens": 1}), out, cache_dir=tmp_path / "c"
        )


def test_recipe_with_fewer_than_three_seeds_or_no_instruction_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"seeds: .*at least 3"):
        skill_recipe_from_dict(skill_data("http://127.0.0.1:9/v1", seeds=["one", "two"]))
    with pytest.raises(RecipeError, match=r"instruction: must not be empty"):
        skill_recipe_from_dict(skill_data("http://127.0.0.1:9/v1", instruction="  "))


def test_a_prompt_file_of_another_skill_is_refused(scripted_llm, tmp_path):
    out = tmp_path / "p.jsonl"
    out.write_text('{"id": 0, "skill": "coco", "prompt": "a cat", "split": "train", "request": 0}\n')
    with pytest.raises(DatasetError, match=r"belongs to skill 'coco', not 'scripted'. Choose another folder \(out\)"):
        generate_prompts(skill(scripted_llm), out, cache_dir=tmp_path / "c")
    assert scripted_llm.requests == []
