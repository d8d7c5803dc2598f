"""Errors carry fields and each front end words them (selma_toolkit/errors.py): ``str(error)`` is the
library's sentence, the CLI names options as flags (selma_toolkit/cli/words.py), the ComfyUI nodes as
their inputs (comfyui_nodes/words.py). Every error below is raised by the real library code."""

from __future__ import annotations

import ast
import errno
import pickle
import re
from pathlib import Path

import httpx
import pytest
import torch

from comfyui_nodes.words import NODE_WORDS, node_errors
from selma_toolkit.cli.words import CLI_WORDS, cli_message
from selma_toolkit.errors import (
    PLAIN,
    DiskFullError,
    LoraFormatError,
    Option,
    OutputError,
    RecipeError,
    Remedy,
    SelmaError,
)

PACKAGE = Path(__file__).resolve().parent.parent / "selma_toolkit"
NODES = PACKAGE.parent / "comfyui_nodes" / "nodes.py"


def raised(call) -> SelmaError:
    with pytest.raises(SelmaError) as info:
        call()
    return info.value


def merge_rank():
    from selma_toolkit.lora.merging.checks import check_options

    check_options("selma", 4, 0.5, "exact")


def merge_unequal_ranks():
    from selma_toolkit.lora import LoraModule, LoraWeights
    from selma_toolkit.lora.merge import merge_experts

    def expert(rank: int) -> LoraWeights:
        return LoraWeights({"unet.a.to_q": LoraModule(down=torch.ones(rank, 4), up=torch.ones(4, rank), alpha=rank)})

    merge_experts([expert(2), expert(4)], "selma", names=["a.safetensors", "b.safetensors"])


def negative_weights():
    from selma_toolkit.lora.merging.checks import expert_weights

    expert_weights([1.0, -0.5], 2, method="ties")


def bias_differences():
    from selma_toolkit.lora import lora_from_state_dict

    state = {
        "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 1, 1),
        "lora_unet_conv_in.lora_up.weight": torch.ones(8, 2, 1, 1),
        "lora_unet_conv_in.diff_b": torch.ones(8),
    }
    lora_from_state_dict(state, source="e.safetensors")


def peft_key_without_component():
    from selma_toolkit.lora import lora_from_state_dict

    lora_from_state_dict(
        {
            "down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(2, 4),
            "down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.ones(4, 2),
        },
        source="peft.safetensors",
    )


def hub_revision_not_found():
    from huggingface_hub.errors import RevisionNotFoundError

    from selma_toolkit.hub.connection import hub_errors

    response = httpx.Response(404, request=httpx.Request("GET", "http://127.0.0.1:9/api/models/alice/x/revision/v9"))
    with hub_errors("alice/x@v9"):
        raise RevisionNotFoundError("no such revision", response=response)


def hub_unreachable():
    from selma_toolkit.hub.connection import hub_errors

    with hub_errors("alice/x@main", endpoint="http://127.0.0.1:9"):
        raise httpx.ConnectError("connection refused")


def unknown_catalog_name(tmp_path, monkeypatch):
    from selma_toolkit.hub import resolve_expert

    monkeypatch.delenv("SELMA_CATALOG", raising=False)
    monkeypatch.chdir(tmp_path)
    resolve_expert("countbench")


def override_of_wrong_type():
    from selma_toolkit.recipe import load_run_recipe

    load_run_recipe("tiny-demo", ["train.steps=ten"])


def output_folder_is_a_file(tmp_path):
    from selma_toolkit.io import check_output_folder

    (tmp_path / "taken").write_text("x")
    check_output_folder(tmp_path / "taken")


# name: (the call, what the CLI says, what the ComfyUI node layer says); None: the nodes have no such option.
CONVERTED = {
    "rank_with_a_rank_keeping_method": (
        merge_rank,
        "--rank 4: only svd, ties and dare choose an output rank; selma keeps",
        "the rank input (4): only svd, ties and dare choose an output rank",
    ),
    "rank_with_a_rank_keeping_method_remedy": (
        merge_rank,
        "Drop --rank or use --method svd.",
        "Set the rank input to 0 or set the method input to svd.",
    ),
    "unequal_ranks": (
        merge_unequal_ranks,
        "Use --method delta (the exact weighted sum of updates, rank = sum of ranks) or use --method svd --rank RANK.",
        "Set the method input to delta (the exact weighted sum of updates, rank = sum of ranks) or set the method "
        "input to svd and the rank input to a value of your choice (0: the experts' largest rank).",
    ),
    "negative_weights": (
        negative_weights,
        "Use --method delta or use --method svd",
        "Set the method input to delta or set the method input to svd",
    ),
    "bias_differences": (
        bias_differences,
        "Use --drop-bias-diffs (the result then differs from the file).",
        "Convert the file with `selma lora convert` and its drop-bias-diffs option",
    ),
    "peft_key_without_component": (
        peft_key_without_component,
        "Use --component unet",
        "Convert the file with `selma lora convert` and its component option set to unet",
    ),
    "hub_revision": (
        hub_revision_not_found,
        "alice/x@v9: revision not found. Check the branch, tag or commit given with --revision.",
        "Check the branch, tag or commit in the revision input",
    ),
    "hub_unreachable": (
        hub_unreachable,
        "Check the network or check the Hub endpoint in HF_ENDPOINT.",
        "Check the network or check the Hub endpoint in the endpoint input (empty: HF_ENDPOINT",
    ),
    "catalog_name": (
        unknown_catalog_name,
        "Give a catalog file with your own entries with --catalog.",
        "Give a catalog file with your own entries in the catalog input",
    ),
    "override": (override_of_wrong_type, "--set train.steps=ten: expected an integer", None),
    "output_folder": (
        output_folder_is_a_file,
        "an existing file; expected a folder (or a path that does not exist "
        "yet). Choose another --out or move the file away.",
        None,
    ),
}


def _call(call, tmp_path, monkeypatch):
    parameters = call.__code__.co_varnames[: call.__code__.co_argcount]
    given = {"tmp_path": tmp_path, "monkeypatch": monkeypatch}
    return lambda: call(**{name: given[name] for name in parameters})


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_each_converted_error_names_flags_in_the_cli_and_inputs_in_the_nodes(name, tmp_path, monkeypatch):
    call, in_cli, in_nodes = CONVERTED[name]
    error = raised(_call(call, tmp_path, monkeypatch))
    assert error.fields is not None, "the error carries no fields"
    assert in_cli in cli_message(error), cli_message(error)
    plain = str(error)
    assert not re.search(r"(?<![`\w-])--[a-z]", plain), plain  # the library's own sentence names no flag
    assert error.fields.what in plain and (error.fields.expected or "") in plain  # every field is in the sentence
    with pytest.raises(SelmaError) as info, node_errors():
        raise error
    worded = str(info.value)
    assert info.value is error and type(info.value) is type(error)  # the same error, class and exit code kept
    assert not re.search(r"(?<![`\w-])--[a-z]", worded.replace("`selma lora convert`", "")), worded
    if in_nodes is not None:
        assert in_nodes in worded, worded


def test_plain_words_are_the_librarys_and_pickling_keeps_the_fields():
    error = raised(merge_rank)
    assert str(error) == (
        "rank 4: only svd, ties and dare choose an output rank; selma keeps the experts' rank. "
        "Leave rank unset or set method to svd."
    )
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is LoraFormatError and copy.fields == error.fields and str(copy) == str(error)
    assert cli_message(copy) == cli_message(error)


def test_a_message_only_error_is_shown_as_it_is_by_every_front_end():
    error = RecipeError("recipes/x.toml: the file is empty; expected a TOML recipe")
    assert error.fields is None
    assert (
        str(error)
        == cli_message(error)
        == error.render(NODE_WORDS)
        == "recipes/x.toml: the file is empty; expected a TOML recipe"
    )
    with pytest.raises(TypeError):
        RecipeError("both", what="a message and fields")


def test_within_names_the_place_before_the_fields_and_keeps_the_class():
    error = raised(peft_key_without_component)
    assert str(error).startswith("peft.safetensors: key 'down_blocks.0.attentions.0.proj_in': has no component prefix")
    assert isinstance(error, LoraFormatError) and error.exit_code == 2


def test_remedies_the_nodes_cannot_offer_are_left_out():
    error = OutputError(
        what="holds another run",
        where="runs/x",
        remedies=[Remedy.do("delete the folder"), Remedy.change("out", "folder"), Remedy.give("filename")],
    )
    assert cli_message(error) == "runs/x: holds another run. Delete the folder, choose another --out or give --file."
    assert error.render(NODE_WORDS) == "runs/x: holds another run. Delete the folder."
    assert str(error) == "runs/x: holds another run. Delete the folder, choose another folder (out) or give filename."


def test_a_disk_full_error_stays_an_oserror_with_its_errno():
    from selma_toolkit.io import disk_full_error

    error = disk_full_error(Path("/tmp/x/out.safetensors"), OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(error, DiskFullError) and isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert str(error).startswith("/tmp/x/out.safetensors: No space left on device while writing it")
    assert cli_message(error).endswith("Free some space, then run the command again or choose another --out.")


def test_option_words_per_front_end():
    assert [words.option("drop_bias_diffs") for words in (PLAIN, CLI_WORDS, NODE_WORDS)] == [
        "drop_bias_diffs",
        "--drop-bias-diffs",
        "the drop_bias_diffs input",
    ]
    assert [words.located("overrides", "a.b=c d") for words in (PLAIN, CLI_WORDS)] == [
        "overrides 'a.b=c d'",
        "--set 'a.b=c d'",
    ]
    assert NODE_WORDS.option("seed") == "the dare_seed input"  # the merge node's name for the DARE seed
    assert isinstance(Option("rank"), Option)


# ------------------------------------------------------------------ no CLI flag in the library


def _flag_texts(node: ast.AST) -> list[str]:
    """The string constants an error is made of, leaving out commands to run (Remedy.run(...))."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "run":
        return []
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    return [text for child in ast.iter_child_nodes(node) for text in _flag_texts(child)]


def test_no_library_error_message_names_a_command_line_flag():
    """What the library raises names options by their library name (Option, Remedy); only the CLI
    (selma_toolkit/cli/) spells flags. A flag inside a `command` in backquotes is a command to run."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "cli" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                text = "".join(_flag_texts(node.exc))
                outside_commands = re.sub(r"`[^`]*`", "", text)
                if re.search(r"(?<![\w-])--[a-z]", outside_commands):
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {text[:120]}")
    assert offenders == []


def test_the_node_pack_rewrites_no_message():
    source = NODES.read_text(encoding="utf-8")
    assert "import re\n" not in source and "re.compile" not in source and "re.sub" not in source
