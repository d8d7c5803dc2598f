"""Malformed names, repo ids and catalog names, unreachable or misbehaving LLM and Hub endpoints,
experts of different families, a read-only output folder (issue 22, item 1, the rest of it): each
through the CLI as a user meets it, one `error: ...` line naming the file, field or key and what was
expected, the exit code of its kind (2: bad input, 1: a runtime failure; selma_toolkit/errors.py),
nothing half-written. docs/reliability.md lists each case with the test that checks it."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
import torch
from conftest import run_cli
from support_cli import files_under, one_error_line
from support_hub import HostileListing, free_port
from support_llm import Fail, Hang, Reply, skill_data

from selma_toolkit import errors
from selma_toolkit.io import read_jsonl

LLM_KEY = "sk-selma-faults-3c9e1a7f5b"  # long enough that masking it in messages changes nothing else
HUB_TOKEN = "hf_selmaFaultsMarker9d2b6e"


def write_lora(path: Path, architecture: str = "sd1", base_model: str = "tiny:sd1") -> Path:
    """A small LoRA saved by the toolkit, its metadata naming its base model and architecture."""
    from selma_toolkit.lora import LoraModule, LoraWeights, lora_metadata, save_lora

    generator = torch.Generator().manual_seed(0)
    modules = {
        f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.{proj}": LoraModule(
            down=torch.randn(2, 32, generator=generator), up=torch.randn(32, 2, generator=generator), alpha=2.0
        )
        for proj in ("to_q", "to_k")
    }
    return save_lora(
        LoraWeights(modules=modules),
        path,
        metadata=lora_metadata(base_model=base_model, architecture=architecture, skill="s"),
    )


def prepare(folder: Path, files: dict[str, str]) -> list[Path]:
    """Write ``files`` (name -> text; a name ending in .safetensors gets a LoRA) into ``folder``."""
    for name, text in files.items():
        if name.endswith(".safetensors"):
            write_lora(folder / name)
        else:
            (folder / name).write_text(text)
    return files_under(folder)


# ---------------------------------------------------------------------------------------- exit codes

EXIT_CODES = {
    # every error class: 2 for what the user gave, 1 for what the environment did
    "InputError": 2,
    "RecipeError": 2,
    "LoraFormatError": 2,
    "DatasetError": 2,
    "ModelError": 2,
    "OutputError": 2,
    "HubInputError": 2,
    "SelmaError": 1,
    "TrainingError": 1,
    "EndpointError": 1,
    "HubError": 1,
    "FolderLockedError": 1,
    "DiskFullError": 1,
    "ModelDownloadError": 1,
}


def test_every_error_class_has_the_exit_code_of_its_kind():
    classes = {
        name: cls for name, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, errors.SelmaError)
    }
    assert set(classes) == set(EXIT_CODES), "a new error class must be sorted here into input (2) or runtime (1)"
    assert {name: cls.exit_code for name, cls in classes.items()} == EXIT_CODES
    assert all(issubclass(classes[name], errors.InputError) == (code == 2) for name, code in EXIT_CODES.items())


def _hub_response(status: int):
    import httpx2

    return httpx2.Response(
        status, request=httpx2.Request("GET", "http://127.0.0.1/alice/model/resolve/main/model_index.json")
    )


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(
            lambda e: e.RepositoryNotFoundError("404 Repository Not Found", response=_hub_response(404)),
            errors.ModelError,
            id="no_such_repo",
        ),
        pytest.param(
            lambda e: e.RevisionNotFoundError("404 Revision Not Found", response=_hub_response(404)),
            errors.ModelError,
            id="no_such_revision",
        ),
        pytest.param(
            lambda e: e.HFValidationError("Repo id must be in the form 'repo_name'"),
            errors.ModelError,
            id="invalid_repo_id",
        ),
        pytest.param(
            lambda e: e.GatedRepoError("403 Gated repo", response=_hub_response(403)),
            errors.ModelDownloadError,
            id="gated_repo",
        ),
        pytest.param(
            lambda e: e.LocalEntryNotFoundError("cannot find the requested files in the local cache"),
            errors.ModelDownloadError,
            id="unreachable_and_not_cached",
        ),
        pytest.param(
            lambda e: e.HfHubHTTPError("500 Server Error", response=_hub_response(500)),
            errors.ModelDownloadError,
            id="server_error",
        ),
    ],
)
def test_a_failed_model_read_from_the_hub_is_bad_input_only_when_the_hub_says_the_reference_names_nothing(
    make, expected
):
    from huggingface_hub import errors as hub_errors

    from selma_toolkit.models import hub_model_error

    error = hub_model_error("alice/model: could not read model_index.json from the Hub", make(hub_errors))
    assert type(error) is expected
    assert error.exit_code == (2 if expected is errors.ModelError else 1)
    assert str(error).startswith("alice/model: could not read model_index.json from the Hub (")


def test_verbose_adds_the_traceback_of_a_refusal_and_keeps_its_line_and_exit_code(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('name = "r"\nbase_model = = "tiny:sd1"\n')
    quiet = one_error_line(run_cli("recipe", "validate", str(recipe)))
    verbose = run_cli("--verbose", "recipe", "validate", str(recipe))
    assert verbose.returncode == 2 and "Traceback (most recent call last)" in verbose.stderr
    assert "RecipeError" in verbose.stderr and verbose.stderr.strip().splitlines()[-1] == quiet


# ------------------------------------------------------------------------------------------- names

SKILL = 'name = "{name}"\nsource = "grammar"\nseeds = ["a", "b", "c"]\n[grammar]\ntemplates = ["a {{x}}"]\nwords = {{x = ["cat"]}}\n'
NAME_HELP = (
    "expected lower-case letters, digits, '-' and '_', starting with a letter or digit (it names folders and "
    "files, so no '/', '.' or spaces), e.g. 'shape-count'"
)

RECIPE_NAMES = {
    # case: (files, selma arguments, file the message names, field, found)
    "skill_name_in_a_skill_recipe": (
        {
            "evil.toml": SKILL.format(name="../evil"),
            "run.toml": 'name = "r"\nbase_model = "tiny:sd1"\nskills = ["evil.toml"]\n',
        },
        ["run", "run.toml", "--out", "out"],
        "evil.toml",
        "name",
        "../evil",
    ),
    "run_name_in_a_run_recipe": (
        {"run.toml": 'name = "../r"\nbase_model = "tiny:sd1"\nskills = ["count-grammar"]\n'},
        ["run", "run.toml"],
        "run.toml",
        "name",
        "../r",
    ),
    "run_name_by_set": ({}, ["run", "tiny-demo", "--set", "name=../../r"], None, "name", "../../r"),
}


@pytest.mark.parametrize("case", sorted(RECIPE_NAMES))
def test_a_skill_or_run_name_that_would_leave_its_folder_is_refused_naming_file_and_field(tmp_path, repo_root, case):
    # A run folder defaults to runs/<name>, a skill's to skills/<name>/: '../r' would write beside the project.
    files, args, named, field, found = RECIPE_NAMES[case]
    before = prepare(tmp_path, files)
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    if named:
        assert result.stderr.strip().splitlines()[-2:] == [
            f"error: {tmp_path / named}: invalid recipe",
            f"  {field}: {NAME_HELP} (found {found!r})",
        ]
    else:  # set by --set: the override is named, not the shipped recipe it changes
        assert one_error_line(result) == f"error: --set {field}={found}: {NAME_HELP}"
    assert files_under(tmp_path) == before and not (tmp_path.parent / "r").exists()


DOTDOT = (
    "refusing file name {name!r}: from a command line, a catalog or a server, it could write outside the target "
    "folder; expected a relative path inside the repo without '..'"
)
CATALOG_ENTRY = 'repo = "alice/x"\nfile = "{file}"\nskill = "s"\nbase_model = "tiny:sd1"\narchitecture = "sd1"\n'

NAMES = {
    # case: (files, selma arguments, expected message after "error: " ({tmp} is the folder))
    "new_skill_name": (
        {},
        ["skill", "new", "../evil"],
        "skill name '../evil': expected lower-case letters, digits, '-' and '_', starting with a letter or "
        "digit (at most 64 characters), e.g. 'shape-count'",
    ),
    "skill_option_of_prompts": (
        {},
        ["prompts", "tiny-demo", "--skill", "../evil", "--out", "out"],
        "run 'tiny-demo' has no skill '../evil'; its skills are ['count-grammar', 'spatial-grammar', 'color-grammar']",
    ),
    "skill_option_of_train": (
        {},
        ["train", "tiny-demo", "--skill", "../evil", "--out", "out"],
        "run 'tiny-demo' has no skill '../evil'; its skills are ['count-grammar', 'spatial-grammar', 'color-grammar']",
    ),
    "catalog_entry_name": (
        {"c.toml": '["../evil"]\n' + CATALOG_ENTRY.format(file="x.safetensors")},
        ["hub", "pull", "evil", "--catalog", "c.toml", "--to", "loras"],
        "c.toml: [../evil]: entry name must be lower-case letters, digits, '-', '_' or '.' (no '/'; "
        "that would read as a repo id)",
    ),
    "hub_file_in_the_reference": (
        {},
        ["hub", "pull", "alice/x:../x.safetensors", "--to", "loras"],
        "alice/x:../x.safetensors@main: " + DOTDOT.format(name="../x.safetensors"),
    ),
    "hub_file_option": (
        {},
        ["hub", "pull", "alice/x", "--file", "sub/../../x.safetensors", "--to", "loras"],
        "alice/x:sub/../../x.safetensors@main: " + DOTDOT.format(name="sub/../../x.safetensors"),
    ),
    "hub_file_absolute": (
        {},
        ["hub", "pull", "alice/x:/etc/x.safetensors", "--to", "loras"],
        "alice/x:/etc/x.safetensors@main: " + DOTDOT.format(name="/etc/x.safetensors"),
    ),
    "catalog_entry_file": (
        {"c.toml": "[bad]\n" + CATALOG_ENTRY.format(file="../x.safetensors")},
        ["hub", "pull", "bad", "--catalog", "c.toml", "--to", "loras"],
        "c.toml: [bad]: file: " + DOTDOT.format(name="../x.safetensors"),
    ),
}


@pytest.mark.parametrize("case", sorted(NAMES))
def test_names_with_dotdot_or_absolute_paths_are_refused_in_one_line_before_anything_is_written(tmp_path, case):
    files, args, expected = NAMES[case]
    before = prepare(tmp_path, files)
    line = one_error_line(run_cli(*args, cwd=tmp_path, env={"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}))
    assert line == "error: " + expected
    assert files_under(tmp_path) == before  # no out/, no loras/, no ../evil.toml


def test_a_file_name_with_dotdot_listed_by_a_hostile_server_is_refused_and_nothing_is_downloaded(tmp_path):
    hostile = HostileListing(["../../evil.safetensors", "README.md"]).start()
    try:
        result = run_cli(
            "hub", "pull", "eve/expert", "--to", str(tmp_path / "loras"), env={"HF_ENDPOINT": hostile.endpoint}
        )
    finally:
        hostile.stop()
    line = one_error_line(result)  # the same check as a name typed by the user: exit code 2
    assert line == "error: eve/expert: file listed by the server: " + DOTDOT.format(name="../../evil.safetensors")
    assert files_under(tmp_path) == [] and [r.path.split("?")[0] for r in hostile.received] == [
        "/api/models/eve/expert/revision/main"
    ]


# ------------------------------------------------------------------------------ repo ids, catalogs

REPO_ID_FORM = "expected owner/name (letters, digits, '-', '_', '.'), e.g. my-user/countbench-sd2"
CATALOG_HINT = "Give a catalog file with your own entries with --catalog."
SHIPPED_NAMES = "selma-sd14, selma-sd2, selma-sdxl, selma-sdxl-512"  # hub/catalog.toml's extract entries

REFERENCES = {
    # case: (files, selma arguments, expected message after "error: ")
    "push_repo_id_without_owner": (
        {"e.safetensors": ""},
        ["hub", "push", "e.safetensors", "alice"],
        f"repo id 'alice': not a valid repo id; {REPO_ID_FORM}",
    ),
    "push_repo_id_with_a_space": (
        {"e.safetensors": ""},
        ["hub", "push", "e.safetensors", "al ice/x"],
        f"repo id 'al ice/x': not a valid repo id; {REPO_ID_FORM}",
    ),
    "push_repo_id_with_double_dash": (
        {"e.safetensors": ""},
        ["hub", "push", "e.safetensors", "alice/x--y"],
        f"repo id 'alice/x--y': not a valid repo id (Cannot have -- or .. in repo_id: 'alice/x--y'.); {REPO_ID_FORM}",
    ),
    "pull_repo_id_ending_in_git": (
        {},
        ["hub", "pull", "alice/x.git", "--to", "loras"],
        f"repo id 'alice/x.git': not a valid repo id (Repo_id cannot end by '.git': 'alice/x.git'.); {REPO_ID_FORM}",
    ),
    "merge_expert_repo_id_with_dotdot": (
        {"a.safetensors": ""},
        ["merge", "alice/x..y", "a.safetensors", "--out", "m.safetensors"],
        f"repo id 'alice/x..y': not a valid repo id (Cannot have -- or .. in repo_id: 'alice/x..y'.); {REPO_ID_FORM}",
    ),
    "pull_unknown_catalog_name": (
        {},
        ["hub", "pull", "no-such-expert", "--to", "loras"],
        "'no-such-expert': no such file, and no catalog entry of that name (catalog names: "
        f"{SHIPPED_NAMES}); a Hub repo is written owner/name. {CATALOG_HINT}",
    ),
    "merge_unknown_catalog_name": (
        {"a.safetensors": "", "c.toml": "[mine]\n" + CATALOG_ENTRY.format(file="x.safetensors")},
        ["merge", "no-such-expert", "a.safetensors", "--out", "m.safetensors"],
        "'no-such-expert': no such file, and no catalog entry of that name (catalog names: "
        f"mine, {SHIPPED_NAMES}); a Hub repo is written owner/name. {CATALOG_HINT}",
    ),
    "catalog_file_missing": ({}, ["hub", "list", "--catalog", "nope.toml"], "nope.toml: catalog file not found"),
    "catalog_file_syntax_error": (
        {"c.toml": '[ok\nrepo = "a/b"\n'},
        ["hub", "list", "--catalog", "c.toml"],
        "c.toml: TOML syntax error: Expected ']' at the end of a table declaration (at line 1, column 4)",
    ),
}


@pytest.mark.parametrize("case", sorted(REFERENCES))
def test_bad_repo_ids_and_unknown_catalog_names_are_refused_in_one_line_with_exit_code_2(tmp_path, case):
    files, args, expected = REFERENCES[case]
    before = prepare(tmp_path, files)
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_TOKEN": HUB_TOKEN}  # nothing may be asked of a server
    if case == "merge_unknown_catalog_name":
        env["SELMA_CATALOG"] = str(tmp_path / "c.toml")
    line = one_error_line(run_cli(*args, cwd=tmp_path, env=env))
    assert line == "error: " + expected
    assert files_under(tmp_path) == before


@pytest.mark.parametrize(
    ("expert", "expected"),
    [
        ("no-such-expert", "'no-such-expert': no such file, and no catalog entry of that name"),
        ("alice/x--y", "repo id 'alice/x--y': not a valid repo id (Cannot have -- or .. in repo_id"),
    ],
    ids=["unknown_catalog_name", "bad_repo_id"],
)
def test_a_run_recipe_listing_an_unknown_expert_is_refused_before_the_run_folder_is_made(tmp_path, expert, expected):
    (tmp_path / "run.toml").write_text(
        f'name = "r"\nbase_model = "tiny:sd1"\nskills = ["count-grammar"]\nexperts = ["{expert}"]\n'
    )
    line = one_error_line(
        run_cli("run", "run.toml", "--out", "out", cwd=tmp_path, env={"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    )
    assert line.startswith("error: " + expected), line
    assert files_under(tmp_path) == [tmp_path / "run.toml"]


# ------------------------------------------------------------------------------------ LLM endpoint


def llm_skill(folder: Path, url: str, **llm: object) -> Path:
    path = folder / "skill.toml"
    path.write_text(tomli_w.dumps(skill_data(url, llm={"concurrency": 1, "max_retries": 1, **llm})))
    return path


def selma_prompts(folder: Path, recipe: Path) -> subprocess.CompletedProcess:
    return run_cli(
        "prompts",
        str(recipe),
        "--out",
        str(folder / "out"),
        env={"SELMA_TEST_LLM_KEY": LLM_KEY, "SELMA_CACHE": str(folder / "cache")},
    )


def kept_note(folder: Path, kept: int = 0) -> str:
    return f". {kept}/12 prompts kept so far are saved in {folder / 'out' / 'prompts.jsonl'}; rerun the same command to continue"


def test_an_unreachable_llm_endpoint_is_one_line_naming_the_url_and_exit_code_1(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"  # a closed port: connection refused
    line = one_error_line(selma_prompts(tmp_path, llm_skill(tmp_path, url)), exit_code=1)
    assert line == (
        f"error: cannot reach {url} (llm.base_url, model 'scripted-llm', api 'completions') after 1 retries "
        "(llm.max_retries); check that the server runs and the URL (usually ending in /v1)" + kept_note(tmp_path)
    )
    assert read_jsonl(tmp_path / "out" / "prompts.jsonl") == []


LLM_FAULTS = {
    # case: (scripted answers, llm settings, expected message after "error: {where} ", where = "URL (llm.base_url, ...)")
    "429_every_time": (
        [Fail(429)] * 4,
        {},
        "is still rate-limiting (429) after 1 retries (llm.max_retries); lower llm.concurrency or wait",
    ),
    "500_every_time": (
        [Fail(500)] * 4,
        {},
        "answered HTTP 500 after 1 retries (llm.max_retries): Error code: 500 - scripted 500",
    ),
    "timeout_every_time": (
        [Hang(3.0)] * 4,
        {"timeout": 0.5},
        "within 0.5 s after 1 retries (llm.max_retries); raise llm.timeout or check the server",
    ),
}


@pytest.mark.parametrize("case", sorted(LLM_FAULTS))
def test_an_llm_endpoint_that_keeps_failing_is_one_line_saying_what_it_answered_and_exit_code_1(
    scripted_llm, tmp_path, case
):
    answers, settings, expected = LLM_FAULTS[case]
    scripted_llm.then(*answers)
    line = one_error_line(selma_prompts(tmp_path, llm_skill(tmp_path, scripted_llm.url, **settings)), exit_code=1)
    where = f"{scripted_llm.url} (llm.base_url, model 'scripted-llm', api 'completions')"
    head = f"error: no answer from {where} " if case == "timeout_every_time" else f"error: {where} "
    assert line == head + expected + kept_note(tmp_path)
    assert len(scripted_llm.requests) == 2  # the request and its one retry (llm.max_retries = 1), no more
    assert read_jsonl(tmp_path / "out" / "prompts.jsonl") == []


def test_garbage_answers_stop_after_max_empty_rounds_with_one_line_and_exit_code_1(scripted_llm, tmp_path):
    scripted_llm.then(*[Reply("I am sorry, I cannot help with that.")] * 3)
    line = one_error_line(
        selma_prompts(tmp_path, llm_skill(tmp_path, scripted_llm.url, max_empty_rounds=3)), exit_code=1
    )
    assert line.startswith(
        f"error: skill 'scripted': 3 answers in a row from {scripted_llm.url} (model 'scripted-llm') "
        "added no usable prompt (llm.max_empty_rounds = 3; "
    ), line
    assert "Expected a numbered list of prompts; check llm.model, llm.api and the instruction" in line
    assert line.endswith(kept_note(tmp_path)) and len(scripted_llm.requests) == 3


def test_an_llm_failing_mid_run_keeps_whole_records_and_a_rerun_completes_them(scripted_llm, tmp_path):
    scripted_llm.then(
        Reply("4. A red fox asleep in the snow\n5. Three glass bottles on a windowsill"), Fail(500), Fail(500)
    )
    recipe = llm_skill(tmp_path, scripted_llm.url)
    line = one_error_line(selma_prompts(tmp_path, recipe), exit_code=1)
    assert line.endswith(kept_note(tmp_path, kept=2)), line
    prompts = tmp_path / "out" / "prompts.jsonl"
    kept = read_jsonl(prompts)  # strict: a torn last line would be an error here
    assert [r["prompt"] for r in kept] == ["A red fox asleep in the snow", "Three glass bottles on a windowsill"]
    again = selma_prompts(tmp_path, recipe)  # the server answers again
    assert again.returncode == 0, again.stderr[-2000:]
    records = read_jsonl(prompts)
    assert [r["id"] for r in records] == list(range(12)) and records[:2] == kept


# ------------------------------------------------------------------------------------ Hub endpoint


def test_an_unreachable_hub_is_one_line_naming_the_endpoint_and_exit_code_1_for_pull_and_push(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    env = {"HF_ENDPOINT": dead, "HF_TOKEN": HUB_TOKEN}
    pulled = one_error_line(run_cli("hub", "pull", "alice/x", "--to", "loras", cwd=tmp_path, env=env), exit_code=1)
    assert pulled.startswith(f"error: alice/x@main: cannot reach the Hub at {dead} (") and pulled.endswith(
        "). Check the network or check the Hub endpoint in HF_ENDPOINT."
    ), pulled
    write_lora(tmp_path / "e.safetensors")
    pushed = one_error_line(run_cli("hub", "push", "e.safetensors", "alice/x", cwd=tmp_path, env=env), exit_code=1)
    assert pushed.startswith(f"error: push to alice/x: cannot reach the Hub at {dead} (") and pushed.endswith(
        "). Check the network or check the Hub endpoint in HF_ENDPOINT."
    ), pushed
    assert files_under(tmp_path) == [tmp_path / "e.safetensors"]


# ------------------------------------------------------------------------- experts, output folders


def test_experts_of_different_families_given_to_merge_are_refused_naming_both(tmp_path):
    write_lora(tmp_path / "sd1.safetensors", "sd1", "tiny:sd1")
    write_lora(tmp_path / "sdxl.safetensors", "sdxl", "tiny:sdxl")
    line = one_error_line(
        run_cli("merge", "sd1.safetensors", "sdxl.safetensors", "--out", "m.safetensors", cwd=tmp_path)
    )
    assert line.startswith(
        "error: sd1.safetensors is a LoRA for sd1 but sdxl.safetensors is one for sdxl (module unet."
    ), line
    assert line.endswith(
        "); experts for different base architectures cannot be merged. Merge only experts trained for one base model."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd1.safetensors", "sdxl.safetensors"]


def test_experts_of_one_name_in_two_folders_are_told_apart_by_their_paths(tmp_path):
    for folder, family in (("flux-run", "sd1"), ("sd3-run", "sdxl")):
        (tmp_path / folder / "experts").mkdir(parents=True)
        write_lora(tmp_path / folder / "experts" / "count-grammar.safetensors", family, f"tiny:{family}")
    line = one_error_line(
        run_cli(
            "merge",
            "flux-run/experts/count-grammar.safetensors",
            "sd3-run/experts/count-grammar.safetensors",
            "--out",
            "m.safetensors",
            cwd=tmp_path,
        )
    )
    assert line.startswith(
        "error: flux-run/experts/count-grammar.safetensors is a LoRA for sd1 but "
        "sd3-run/experts/count-grammar.safetensors is one for sdxl (module unet."
    ), line


def read_only_selma(folder: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`selma ARGS` with ``folder`` read-only: mode 0555 for a normal user; for root (which mode bits do
    not stop) a read-only tmpfs mounted on it in a private mount namespace (`unshare -m`), which ends
    with the command. Skips when neither is possible."""
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            return run_cli(*args, cwd=cwd)
        finally:
            folder.chmod(0o755)
    mount = 'mount -t tmpfs -o ro,size=1m tmpfs "$0" || exit 99; exec "$@"'
    command = ["unshare", "-m", "sh", "-c", mount, str(folder), sys.executable, "-m", "selma_toolkit", *args]
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=600)
    except FileNotFoundError:
        pytest.skip("root, and no unshare to mount a read-only file system")
    if result.returncode == 99 or "unshare failed" in result.stderr:
        pytest.skip(f"root, and a read-only file system cannot be mounted here: {result.stderr.strip()[-300:]}")
    return result


@pytest.mark.parametrize("command", ["merge", "run"])
def test_an_output_in_a_read_only_folder_is_refused_naming_the_folder_before_any_work(tmp_path, command):
    read_only = tmp_path / "ro"
    if command == "merge":
        write_lora(tmp_path / "a.safetensors")
        write_lora(tmp_path / "b.safetensors")
        target, args = (
            read_only / "m.safetensors",
            ["merge", "a.safetensors", "b.safetensors", "--out", "ro/m.safetensors"],
        )
    else:
        target, args = read_only / "run", ["run", "tiny-demo", "--out", "ro/run"]
    before = [p for p in files_under(tmp_path)]
    line = one_error_line(read_only_selma(read_only, *args, cwd=tmp_path))
    assert line == (
        f"error: {target.relative_to(tmp_path)}: cannot write here (its nearest existing folder ro): permission "
        "denied or a read-only file system. Choose another --out or change its permissions."
    )
    assert files_under(tmp_path) == sorted([*before, read_only])
