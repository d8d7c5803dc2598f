"""Hub push / pull / catalog against local servers: olah (a real Hub mirror) serves the reads, a
write stand-in (tests/support_hub.py) takes create/preupload/commit and stores real git commits
that olah then serves. The real huggingface_hub client talks to both."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support_hub import (
    HostileListing,
    HubWriteStandIn,
    OlahHub,
    commit_count,
    commit_files,
    free_port,
    head,
    init_repo,
    repo_file,
    repo_files,
    write_expert,
)

from selma_toolkit.errors import HubError, LoraFormatError
from selma_toolkit.hub import push_expert, read_catalog, resolve_expert
from selma_toolkit.io import sha256_file

TOKEN = "hf_selmaTestMarkerToken7f3a9c"


class Hub:
    def __init__(self, olah: OlahHub, writer: HubWriteStandIn):
        self.olah, self.writer = olah, writer
        self.read, self.write = olah.endpoint, writer.endpoint

    def repo(self, repo_id: str) -> Path:
        return self.olah.mirrors / "models" / repo_id

    def push(self, path: Path, repo_id: str, **kwargs) -> str:
        return push_expert(path, repo_id, token=TOKEN, endpoint=self.write, **kwargs)

    def pull(self, ref: str, **kwargs) -> Path:
        return resolve_expert(ref, endpoint=self.read, **kwargs)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    olah = OlahHub(root).start()
    writer = HubWriteStandIn(olah.mirrors, TOKEN).start()
    try:
        yield Hub(olah, writer)
    finally:
        writer.stop()
        olah.stop()


def make_run(root: Path) -> Path:
    """A run folder in the RunPaths layout: resolved recipe, two experts, a merged LoRA, scores, eval images."""
    from PIL import Image

    from selma_toolkit.lora import merge_files
    from selma_toolkit.paths import RunPaths
    from selma_toolkit.recipe import load_run_recipe, write_resolved_recipe

    recipe = load_run_recipe("tiny-demo", ["base_model=stabilityai/stable-diffusion-2-1-base", "license=openrail++"])
    paths = RunPaths(root)
    write_resolved_recipe(recipe, root)
    skills = [s.name for s in recipe.skills][:2]
    for seed, skill in enumerate(skills):
        write_expert(paths.expert(skill), skill=skill, seed=seed)
        paths.prompts(skill).parent.mkdir(parents=True, exist_ok=True)
        paths.prompts(skill).write_text(
            "".join(json.dumps({"id": i, "skill": skill, "prompt": f"p{i}"}) + "\n" for i in range(7))
        )
    merge_files([paths.expert(skill) for skill in skills], paths.merged("selma"), "selma")
    paths.eval_dir.mkdir(parents=True)
    (paths.eval_dir / "scores.json").write_text(
        json.dumps({"merged": {"clipscore": 31.25}, "base": {"clipscore": 29.5}})
    )
    for i in range(3):
        Image.new("RGB", (32, 32), (80 * i, 0, 0)).save(paths.eval_dir / f"{i}.png")
    paths.report.parent.mkdir(parents=True)
    Image.new("RGB", (64, 32), "blue").save(paths.report.parent / "clipscore.png")
    return root


@pytest.fixture(scope="module")
def pushed_run(hub, tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("run") / "demo")
    before = len(hub.writer.received)
    url = hub.push(run, "alice/demo-run")
    return run, url, hub.writer.received[before:]


def _cli(*args: str, env: dict[str, str], drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in drop} | {"COLUMNS": "200"} | env
    return subprocess.run(
        [sys.executable, "-m", "selma_toolkit", *args], capture_output=True, text=True, env=full, timeout=120
    )


def _write_catalog(path: Path, **entries: dict[str, str]) -> Path:
    lines = []
    for name, table in entries.items():
        lines.append(f"[{name}]")
        lines += [f'{key} = "{value}"' for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _entry(repo: str, file: str, **extra: str) -> dict[str, str]:
    return {
        "repo": repo,
        "file": file,
        "skill": "countbench",
        "base_model": "stabilityai/stable-diffusion-2-1-base",
        "architecture": "sd2",
        **extra,
    }


# ------------------------------------------------------------------------------- push and pull


def test_push_then_pull_gives_the_byte_identical_expert_from_the_cache(hub, tmp_path):
    from huggingface_hub import constants

    expert = write_expert(tmp_path / "countbench.safetensors", skill="countbench", seed=1)
    before = len(hub.writer.received)
    url = hub.push(expert, "alice/countbench")
    sent = hub.writer.received[before:]
    assert "/alice/countbench/commit/" in url
    assert sum("/commit/" in r.path for r in sent) == 1, "one push is one commit"
    assert set(repo_files(hub.repo("alice/countbench"))) == {".gitattributes", "countbench.safetensors", "README.md"}

    pulled = hub.pull("alice/countbench")
    assert pulled.read_bytes() == expert.read_bytes()
    assert Path(constants.HF_HUB_CACHE) in pulled.parents, "downloads go to the standard Hugging Face cache"


def test_second_push_makes_a_new_revision_and_the_old_revision_still_pulls_the_old_file(hub, tmp_path):
    first = write_expert(tmp_path / "v1" / "whoops.safetensors", skill="whoops", seed=1)
    second = write_expert(tmp_path / "v2" / "whoops.safetensors", skill="whoops", seed=2)
    hub.push(first, "alice/whoops")
    old = head(hub.repo("alice/whoops"))
    hub.push(second, "alice/whoops")
    assert head(hub.repo("alice/whoops")) != old
    assert hub.pull("alice/whoops").read_bytes() == second.read_bytes()
    assert hub.pull("alice/whoops", revision=old).read_bytes() == first.read_bytes()


def test_push_to_a_branch_leaves_main_unchanged(hub, tmp_path):
    main = write_expert(tmp_path / "a" / "coco.safetensors", skill="coco", seed=1)
    dev = write_expert(tmp_path / "b" / "coco.safetensors", skill="coco", seed=2)
    hub.push(main, "alice/coco")
    hub.push(dev, "alice/coco", revision="dev")
    assert hub.pull("alice/coco").read_bytes() == main.read_bytes()
    assert hub.pull("alice/coco", revision="dev").read_bytes() == dev.read_bytes()


def test_private_push_creates_a_private_repo(hub, tmp_path):
    hub.push(write_expert(tmp_path / "x.safetensors", skill="coco", seed=3), "alice/private-one", private=True)
    hub.push(write_expert(tmp_path / "y.safetensors", skill="coco", seed=3), "alice/public-one")
    assert hub.writer.private["alice/private-one"] is True
    assert hub.writer.private["alice/public-one"] is False


def test_pushing_a_run_folder_uploads_loras_recipe_scores_samples_and_card_in_one_commit(hub, pushed_run):
    run, _url, sent = pushed_run
    repo = hub.repo("alice/demo-run")
    assert sum("/commit/" in r.path for r in sent) == 1 and commit_count(repo) == 2  # the repo's initial commit + ours
    experts = sorted(f"experts/{p.name}" for p in (run / "experts").glob("*.safetensors"))
    assert set(repo_files(repo)) == {
        ".gitattributes",
        "README.md",
        "recipe.toml",
        "eval/scores.json",
        "samples.png",
        "report/clipscore.png",
        "merged/selma.safetensors",
        *experts,
    }
    for name in [*experts, "merged/selma.safetensors", "recipe.toml", "eval/scores.json", "report/clipscore.png"]:
        assert repo_file(repo, "main", name) == (run / name).read_bytes(), name
    from PIL import Image

    assert Image.open(io.BytesIO(repo_file(repo, "main", "samples.png"))).size == (3 * 256, 256)  # 3 eval images, 1 row
    message = subprocess.run(
        ["git", f"--git-dir={repo}", "log", "-1", "--format=%B"], capture_output=True, text=True
    ).stdout
    assert message.startswith("Upload SELMA run tiny-demo: 2 experts, 1 merged LoRA")


def test_model_card_metadata_read_back_with_ModelCard_load_has_the_hub_fields(hub, pushed_run):
    run, _, _ = pushed_run
    code = (
        "import json; from huggingface_hub import ModelCard; c = ModelCard.load('alice/demo-run'); "
        "print(json.dumps({'data': c.data.to_dict(), 'text': c.text}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_ENDPOINT": hub.read},
    )
    assert result.returncode == 0, result.stderr
    card = json.loads(result.stdout)
    data, text = card["data"], card["text"]
    skills = sorted(p.stem for p in (run / "experts").glob("*.safetensors"))
    assert data["base_model"] == "stabilityai/stable-diffusion-2-1-base"
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert data["license"] == "openrail++"  # from the recipe
    assert set(data["tags"]) == {"lora", "text-to-image", "stable-diffusion", "selma", *skills}
    assert 'pipe.load_lora_weights("alice/demo-run", weight_name="merged/selma.safetensors")' in text
    assert "ComfyUI" in text and "@article{li2024selma" in text and "arXiv:2403.06952" in text
    assert "| merged / clipscore | 31.25 |" in text and "| base / clipscore | 29.5 |" in text
    assert "Prompts kept in this run: 7" in text and "rank 8" in text and "![samples.png](samples.png)" in text
    assert "![report/clipscore.png](report/clipscore.png)" in text


def test_pushing_one_expert_of_a_run_adds_the_run_recipe_and_describes_the_skill(hub, pushed_run):
    from selma_toolkit.recipe import load_run_recipe

    run, _, _ = pushed_run
    expert = sorted((run / "experts").glob("*.safetensors"))[0]
    hub.push(expert, "alice/one-of-run")
    repo = hub.repo("alice/one-of-run")
    assert set(repo_files(repo)) == {".gitattributes", expert.name, "recipe.toml", "README.md"}
    readme = repo_file(repo, "main", "README.md").decode()
    skill = load_run_recipe(run / "recipe.toml").skill(expert.stem)
    assert "license: openrail++" in readme and f"### {skill.name}" in readme and skill.description in readme
    assert f'weight_name="{expert.name}"' in readme


def test_selma_merge_accepts_catalog_names_and_hub_repo_ids_as_experts(hub, tmp_path):
    from selma_toolkit.lora import load_lora
    from selma_toolkit.lora.merge import merge_record

    first = write_expert(tmp_path / "m1.safetensors", skill="coco", seed=11)
    second = write_expert(tmp_path / "m2.safetensors", skill="whoops", seed=12)
    hub.push(first, "alice/merge-one")
    hub.push(second, "alice/merge-two")
    catalog = _write_catalog(tmp_path / "mine.toml", **{"coco-mine": _entry("alice/merge-one", "m1.safetensors")})
    out = tmp_path / "merged.safetensors"
    result = _cli(
        "merge",
        "coco-mine",
        "alice/merge-two:m2.safetensors",
        "--out",
        str(out),
        env={"HF_ENDPOINT": hub.read, "SELMA_CATALOG": str(catalog)},
    )
    assert result.returncode == 0, result.stderr
    record = merge_record(load_lora(out))
    assert [e["sha256"] for e in record["experts"]] == [sha256_file(first), sha256_file(second)]


def test_a_repo_with_several_experts_needs_a_file_name(hub, pushed_run):
    run, _, _ = pushed_run
    with pytest.raises(HubError, match=r"holds 3 \.safetensors files .*alice/demo-run:FILE"):
        hub.pull("alice/demo-run")
    pulled = hub.pull("alice/demo-run:merged/selma.safetensors")
    assert pulled.read_bytes() == (run / "merged/selma.safetensors").read_bytes()


def test_offline_pull_is_served_from_the_cache_without_any_server(hub, tmp_path):
    expert = write_expert(tmp_path / "offline.safetensors", skill="coco", seed=4)
    hub.push(expert, "alice/offline")
    hub.pull("alice/offline")  # online once
    dead = f"http://127.0.0.1:{free_port()}"
    result = _cli("hub", "pull", "alice/offline", env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": dead})
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).read_bytes() == expert.read_bytes()
    never = _cli("hub", "pull", "alice/never-pulled", env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": dead})
    assert never.returncode == 1 and "pull it once while online" in never.stderr and "Traceback" not in never.stderr


# -------------------------------------------------------------------------------------- catalog


def test_catalog_name_resolves_through_the_cli_verifies_sha256_and_copies_to_a_folder(hub, tmp_path):
    expert = write_expert(tmp_path / "countbench.safetensors", skill="countbench", seed=5)
    hub.push(expert, "alice/catalogued")
    catalog = _write_catalog(
        tmp_path / "mine.toml",
        **{"countbench-sd2": _entry("alice/catalogued", "countbench.safetensors", sha256=sha256_file(expert))},
    )
    loras = tmp_path / "ComfyUI" / "models" / "loras"
    result = _cli(
        "hub", "pull", "countbench-sd2", "--catalog", str(catalog), "--to", str(loras), env={"HF_ENDPOINT": hub.read}
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == loras / "countbench.safetensors"
    assert (loras / "countbench.safetensors").read_bytes() == expert.read_bytes()
    assert sorted(p.name for p in loras.iterdir()) == ["countbench.safetensors"], "nothing but the file in the target"


def test_hub_list_shows_user_catalog_entries(tmp_path):
    catalog = _write_catalog(
        tmp_path / "mine.toml", **{"countbench-sd2": _entry("alice/catalogued", "countbench.safetensors")}
    )
    result = _cli("hub", "list", "--catalog", str(catalog), env={})
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "countbench-sd2" in line)
    assert "countbench" in row and "stabilityai/stable-diffusion-2-1-base" in row and "alice/catalogued" in row


def test_shipped_catalog_entries_are_all_valid_and_pinned():
    from selma_toolkit.resources import shipped_dir

    for entry in read_catalog(shipped_dir("hub") / "catalog.toml").values():
        # A published file is pinned by its sha256; an extract entry's file is made locally (tests/test_extract_hub.py).
        assert entry.sha256 is not None or entry.kind == "extract", f"{entry.name}: shipped files pin their sha256"


def test_sha256_mismatch_is_an_error_and_the_bad_file_is_removed(hub, tmp_path):
    from huggingface_hub import constants

    expert = write_expert(tmp_path / "countbench.safetensors", skill="countbench", seed=6)
    hub.push(expert, "alice/tampered")
    catalog = _write_catalog(
        tmp_path / "c.toml", tampered=_entry("alice/tampered", "countbench.safetensors", sha256="0" * 64)
    )
    target = tmp_path / "loras"
    with pytest.raises(
        HubError, match=f"sha256 of the download is {sha256_file(expert)}, the catalog expects 0{{64}}.*removed"
    ):
        hub.pull("tampered", catalog=catalog, to=target)
    cached = Path(constants.HF_HUB_CACHE) / "models--alice--tampered"
    assert not list(cached.glob("snapshots/*/countbench.safetensors")) and not list(cached.glob("blobs/*"))
    assert not (target / "countbench.safetensors").exists()


def test_catalog_errors_name_the_file_the_entry_and_the_key(tmp_path):
    cases = {
        "unknown key(s) ['sha']": _entry("alice/x", "x.safetensors", sha="abc"),
        "sha256 'abc': expected 64 lower-case hex digits": _entry("alice/x", "x.safetensors", sha256="abc"),
        "refusing file name '../x.safetensors'": _entry("alice/x", "../x.safetensors"),
        "refusing file name '/abs/x.safetensors'": _entry("alice/x", "/abs/x.safetensors"),
        "'x.ckpt': not a .safetensors file (a pickle file": _entry("alice/x", "x.ckpt"),
        "repo id 'alice': not a valid repo id": _entry("alice", "x.safetensors"),
    }
    for expected, table in cases.items():
        path = _write_catalog(tmp_path / "bad.toml", bad=table)
        with pytest.raises(HubError) as info:
            read_catalog(path)
        assert str(path) in str(info.value) and "[bad]" in str(info.value) and expected in str(info.value)


# ----------------------------------------------------------------------------- bad input, security


def test_local_file_is_returned_as_is_and_pickles_or_folders_are_refused(tmp_path):
    expert = write_expert(tmp_path / "mine.safetensors", skill="coco", seed=7)
    assert resolve_expert(str(expert)) == expert
    pickle = tmp_path / "mine.bin"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(HubError, match="a pickle file: loading one can run arbitrary code"):
        resolve_expert(pickle)
    with pytest.raises(LoraFormatError, match="is a folder"):
        resolve_expert(tmp_path)
    with pytest.raises(HubError, match="no such file"):
        resolve_expert(tmp_path / "missing.safetensors")
    with pytest.raises(HubError, match="no catalog entry of that name"):
        resolve_expert("no-such-skill")


def test_invalid_repo_ids_are_refused_with_the_expected_form(tmp_path):
    expert = write_expert(tmp_path / "e.safetensors", skill="coco", seed=8)
    for bad in (
        "alice",
        "alice/",
        "-alice/x",
        "alice/x--y",
        "alice/x..y",
        "alice/x.git",
        "al ice/x",
        "alice/" + "x" * 97,
    ):
        with pytest.raises(HubError, match="not a valid repo id"):
            push_expert(expert, bad, token=TOKEN, endpoint="http://127.0.0.1:9")
    with pytest.raises(HubError, match="not a valid repo id"):
        resolve_expert("alice/x--y", endpoint="http://127.0.0.1:9")


def test_an_unreachable_hub_is_a_clear_error(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(HubError, match=r"cannot reach the Hub .*Check the network or check the Hub endpoint given as "):
        push_expert(
            write_expert(tmp_path / "e.safetensors", skill="coco", seed=8), "alice/x", token=TOKEN, endpoint=dead
        )
    # (A pull with a file name goes straight to hf_hub_download, which retries for about 20 s first.)
    with pytest.raises(HubError, match=f"alice/unreachable@main: cannot reach the Hub at {dead} .*Hub endpoint"):
        resolve_expert("alice/unreachable", endpoint=dead)


def test_non_safetensors_files_in_a_repo_are_refused(hub):
    repo = init_repo(hub.olah.mirrors, "mallory/pickles")
    commit_files(repo, {"expert.bin": b"\x80\x04not really", "README.md": b"hi\n"}, "pickles only")
    with pytest.raises(HubError, match=r"only pickle weight files \(expert\.bin"):
        hub.pull("mallory/pickles")
    with pytest.raises(HubError, match="not a .safetensors file"):
        hub.pull("mallory/pickles:expert.bin")
    fake = init_repo(hub.olah.mirrors, "mallory/fake")
    commit_files(fake, {"expert.safetensors": b"this is not a safetensors file at all"}, "fake")
    with pytest.raises(HubError, match="not a valid .safetensors file .*removed"):
        hub.pull("mallory/fake")


@pytest.mark.parametrize("name", ["../../evil.safetensors", "/etc/evil.safetensors", "sub/../../evil.safetensors"])
def test_file_names_from_the_server_with_dotdot_or_absolute_paths_are_refused(name):
    hostile = HostileListing([name, "README.md"]).start()
    try:
        with pytest.raises(HubError, match="refusing file name"):
            resolve_expert("eve/expert", endpoint=hostile.endpoint)
    finally:
        hostile.stop()
    with pytest.raises(HubError, match="refusing file name"):
        resolve_expert(f"eve/expert:{name}", endpoint=hostile.endpoint)


def test_push_without_a_token_says_how_to_log_in_and_sends_nothing(hub, tmp_path):
    expert = write_expert(tmp_path / "e.safetensors", skill="coco", seed=9)
    before = len(hub.writer.received)
    result = _cli(
        "hub",
        "push",
        str(expert),
        "alice/no-token",
        drop=("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
        env={"HF_ENDPOINT": hub.write, "HF_HOME": str(tmp_path / "empty-home")},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "hf auth login" in result.stderr and "huggingface-cli login" in result.stderr and "HF_TOKEN" in result.stderr
    assert len(hub.writer.received) == before


def test_a_rejected_token_gives_the_login_hint_without_the_token(hub, tmp_path):
    expert = write_expert(tmp_path / "e.safetensors", skill="coco", seed=10)
    with pytest.raises(HubError, match="HTTP 401.*hf auth login") as info:
        push_expert(expert, "alice/wrong-token", token="hf_wrongMarker123", endpoint=hub.write)
    assert "hf_wrongMarker123" not in str(info.value)


def test_the_token_never_appears_in_output_logs_cards_or_uploaded_files(hub, tmp_path):
    run = make_run(tmp_path / "run")
    home = tmp_path / "hf-home"
    before = len(hub.writer.received)
    result = _cli(
        "--verbose",
        "hub",
        "push",
        str(run),
        "alice/secret-scan",
        env={"HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.write, "HF_HOME": str(home)},
    )
    assert result.returncode == 0, result.stderr
    sent = hub.writer.received[before:]
    # The token was really used (so the scan below means something) ...
    assert sent and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in sent)
    # ... and is nowhere else: printed output, request bodies, files written here, files in the repo.
    assert TOKEN not in result.stdout + result.stderr
    assert all(TOKEN.encode() not in r.body and TOKEN not in r.path for r in sent)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(TOKEN.encode() not in p.read_bytes() for p in written)
    repo = hub.repo("alice/secret-scan")
    assert all(TOKEN.encode() not in repo_file(repo, "main", name) for name in repo_files(repo))
    log = subprocess.run(["git", f"--git-dir={repo}", "log", "--format=%B"], capture_output=True, text=True).stdout
    assert "README.md" in log and TOKEN not in log
