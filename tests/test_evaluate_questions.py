"""Question files (DSG-1k CSV, TIFA JSON, JSONL, dataset folders) and DSG's dependency rule."""

from __future__ import annotations

import csv
import json

import pytest
from support_evaluate import drawn_image

from selma_toolkit.errors import DatasetError
from selma_toolkit.evaluate import build_scorer, read_questions
from selma_toolkit.evaluate.questions import Question
from selma_toolkit.evaluate.vqa import dsg_score
from selma_toolkit.recipe import EvaluateSettings

# Rows in the layout of DSG-1k's annotation CSV (children listed before their parents on purpose).
DSG_ROWS = [
    {
        "item_id": "x1",
        "text": "a red cube on a table",
        "proposition_id": "3",
        "dependency": "1,2",
        "question_natural_language": "is the cube on the table?",
    },
    {
        "item_id": "x1",
        "text": "a red cube on a table",
        "proposition_id": "1",
        "dependency": "0",
        "question_natural_language": "is there a cube?",
    },
    {
        "item_id": "x1",
        "text": "a red cube on a table",
        "proposition_id": "2",
        "dependency": "0",
        "question_natural_language": "is there a table?",
    },
    {
        "item_id": "x1",
        "text": "a red cube on a table",
        "proposition_id": "4",
        "dependency": "1",
        "question_natural_language": "is the cube red?",
    },
    {
        "item_id": "x2",
        "text": "two dogs",
        "proposition_id": "1",
        "dependency": "0",
        "question_natural_language": "are there dogs?",
    },
]


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_dsg_csv_groups_questions_by_prompt_with_parents_first(tmp_path):
    questions = read_questions(write_csv(tmp_path / "dsg-1k-anns.csv", DSG_ROWS))
    assert questions.prompts() == ["a red cube on a table", "two dogs"]
    cube = questions.for_prompt(" a red cube on a table ")
    assert [q.id for q in cube] == ["1", "2", "3", "4"]
    assert cube[2].parents == ("1", "2") and cube[0].parents == () and cube[0].answer == "yes"
    assert questions.num_questions == 5 and questions.for_prompt("a cat") is None


def test_tifa_json_and_jsonl_and_dataset_folder_read_the_same_questions(tmp_path):
    tifa = [
        {
            "id": "coco_1",
            "caption": "two dogs",
            "question": "how many dogs are there?",
            "choices": ["1", "2", "3"],
            "answer": "2",
        },
        {
            "id": "coco_1",
            "caption": "two dogs",
            "question": "are there dogs?",
            "choices": ["yes", "no"],
            "answer": "yes",
        },
    ]
    (tmp_path / "tifa.json").write_text(json.dumps(tifa))
    (tmp_path / "tifa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tifa))
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tifa))
    read = [
        read_questions(tmp_path / "tifa.json"),
        read_questions(tmp_path / "tifa.jsonl"),
        read_questions(str(folder)),
    ]
    for questions in read:
        first = questions.for_prompt("two dogs")[0]
        assert (first.text, first.choices, first.answer) == ("how many dogs are there?", ("1", "2", "3"), "2")
    assert read[0].by_prompt == read[1].by_prompt == read[2].by_prompt


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "a cube", "query": "is there a cube?"}], "needs a prompt column"),
        ([{"prompt": "a cube", "question": "q", "question_id": 1, "parents": [2]}], r"depends on \['2'\]"),
        (
            [
                {"prompt": "a cube", "question": "q1", "question_id": 1, "parents": [2]},
                {"prompt": "a cube", "question": "q2", "question_id": 2, "parents": [1]},
            ],
            "form a cycle",
        ),
        ([{"prompt": "a cube", "question": "q", "answer": "maybe"}], "not among the choices"),
    ],
)
def test_malformed_question_files_name_the_record_and_the_problem(tmp_path, rows, message):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match=message) as error:
        read_questions(path)
    assert str(path) in str(error.value)


def test_dsg_rule_counts_children_of_a_failed_parent_as_wrong():
    questions = [
        Question("1", "cube?"),
        Question("2", "table?"),
        Question("3", "on?", parents=("1", "2")),
        Question("4", "red?", parents=("1",)),
    ]
    all_yes = {"1": "yes", "2": "yes", "3": "yes", "4": "yes"}
    assert dsg_score(questions, all_yes) == (100.0, {"1": True, "2": True, "3": True, "4": True})
    # No table: question 3 depends on it and counts as wrong although the model said yes.
    score, correct = dsg_score(questions, all_yes | {"2": "no"})
    assert correct == {"1": True, "2": False, "3": False, "4": True} and score == 50.0
    # No cube: every question about the cube fails with it.
    score, correct = dsg_score(questions, all_yes | {"1": "no"})
    assert correct == {"1": False, "2": True, "3": False, "4": False} and score == 25.0


def test_a_published_benchmarks_flaws_are_read_as_its_code_reads_them():
    from selma_toolkit.evaluate.questions import questions_from_records

    rows = [
        {"item_id": "a_1", "text": "a cube", "proposition_id": 1, "question": "q1", "dependency": "2"},
        {"item_id": "a_1", "text": "a cube", "proposition_id": 2, "question": "q2", "dependency": "1"},
        {"item_id": "b_1", "text": "a ball", "proposition_id": 1, "question": "q1", "dependency": "0"},
        {"item_id": "b_1", "text": "a ball", "proposition_id": 2, "question": "q2", "dependency": "1, air"},
    ]
    with pytest.raises(DatasetError, match="form a cycle"):
        questions_from_records(rows, "f.csv", "item_id")
    published = questions_from_records(rows, "f.csv", "item_id", as_published=True)
    # The cycle is kept in file order (DSG's rule then reads each parent's own answer); the item with a
    # word among its parents has none.
    assert [(q.id, q.parents) for q in published.items["a_1"][1]] == [("1", ("2",)), ("2", ("1",))]
    assert [(q.id, q.parents) for q in published.items["b_1"][1]] == [("1", ()), ("2", ())]


def test_dsg_rule_as_dsg_and_dpg_benchmark_code_apply_it():
    chain = [
        Question("1", "is there a cube?"),
        Question("2", "is the cube red?", ("1",)),
        Question("3", "is the red cube shiny?", ("2",)),
    ]
    answers = {"1": "no", "2": "yes", "3": "yes"}
    # This toolkit's rule (and DPG-Bench's code): a failure runs down the chain.
    assert dsg_score(chain, answers) == (0.0, {"1": False, "2": False, "3": False})
    # DSG-1k's released code: a parent passes on its own answer, so the grandchild keeps its yes.
    assert dsg_score(chain, answers, transitive=False) == (100 / 3, {"1": False, "2": False, "3": True})
    # DPG-Bench's code walks its file in order: a parent not reached yet passes on its own answer.
    child_first = [chain[1], chain[0], chain[2]]
    assert dsg_score(child_first, answers)[1] == {"2": False, "1": False, "3": False}
    assert dsg_score(child_first, {"1": "yes", "2": "no", "3": "yes"})[1] == {"2": False, "1": True, "3": False}


def test_question_scorer_applies_the_dsg_rule_to_the_vqa_models_answers(tmp_path):
    path = write_csv(tmp_path / "dsg.csv", DSG_ROWS)
    scorer = build_scorer(
        "questions", EvaluateSettings(scorers=["questions"], questions=str(path), vqa_model="tiny:vqa")
    )
    images = [drawn_image(1), drawn_image(2), drawn_image(3)]
    prompts = ["a red cube on a table", "two dogs", "a prompt without questions"]
    scores = scorer.score(images, prompts)
    for image, prompt, score in zip(images[:2], prompts[:2], scores):
        questions = scorer.questions.for_prompt(prompt)
        answers = scorer.answers(image, questions)
        assert set(answers.values()) <= {"yes", "no"}
        assert score == dsg_score(questions, answers)[0]
    assert scores[2] is None


def test_cached_question_scores_are_tied_to_the_question_file_contents(tmp_path):
    def scorer_for(rows):
        path = write_csv(tmp_path / "dsg.csv", rows)
        return build_scorer(
            "questions", EvaluateSettings(scorers=["questions"], questions=str(path), vqa_model="tiny:vqa")
        )

    same, again = scorer_for(DSG_ROWS), scorer_for(DSG_ROWS)
    edited = scorer_for([*DSG_ROWS[:-1], dict(DSG_ROWS[-1], question_natural_language="is there a dog?")])
    assert same.cache_key == again.cache_key != edited.cache_key
    assert same.cache_key.startswith("tiny:vqa|questions:")
