"""The merge method table (selma_toolkit.config.merge_methods): the one list every other place reads."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing

import pytest
import torch

from selma_toolkit.config.merge_methods import (
    FACTORED_METHODS,
    LINEAR_METHODS,
    MERGE_METHODS,
    METHODS,
    MergeMethod,
    method_help,
)
from selma_toolkit.lora import LoraModule, LoraWeights, merge_experts
from selma_toolkit.lora.merging import formulas


def expert(seed: int, rank: int = 2) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    module = LoraModule(
        down=torch.randn(rank, 6, generator=g, dtype=torch.float64),
        up=torch.randn(5, rank, generator=g, dtype=torch.float64),
        alpha=float(rank),
    )
    return LoraWeights(modules={"unet.mid_block.attentions.0.proj_in": module})


def test_the_table_imports_without_torch_so_recipes_and_the_cli_start_fast():
    code = (
        "import sys, selma_toolkit.config.merge_methods, selma_toolkit.recipe, selma_toolkit.cli; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_recipes_adapters_and_the_cli_take_their_methods_from_the_table():
    from selma_toolkit.adapters.diffusers import AdapterMethod
    from selma_toolkit.recipe import MergeSettings

    assert typing.get_args(MergeMethod) == MERGE_METHODS == ("selma", "delta", "svd", "ties", "dare")
    assert typing.get_args(AdapterMethod) == (*MERGE_METHODS, "runtime")
    assert [MergeSettings(method=m).method for m in MERGE_METHODS] == list(MERGE_METHODS)
    assert all(f"{name} (" in method_help() for name in MERGE_METHODS)
    assert LINEAR_METHODS == ("selma", "delta") and FACTORED_METHODS == ("svd", "ties", "dare")


@pytest.mark.parametrize("name", MERGE_METHODS)
def test_each_method_names_a_formula_and_records_only_the_settings_it_uses(name):
    spec = METHODS[name]
    assert callable(getattr(formulas, spec.formula))
    merged = merge_experts([expert(1), expert(2)], name, rank=2 if spec.dense else None, density=0.7, seed=3)
    record = json.loads(merged.metadata["selma.merge"])
    assert (record["rank"] is not None, record["svd_mode"] is not None) == (spec.dense, spec.dense)
    assert (record["density"] is not None) == bool(spec.density)
    assert (record["seed"] is not None) == bool(spec.seed)


def test_a_method_added_to_the_table_merges_records_and_is_checked(monkeypatch):
    monkeypatch.setitem(METHODS, "svd_copy", dataclasses.replace(METHODS["svd"], name="svd_copy"))
    experts = [expert(4, rank=3), expert(5, rank=1)]
    copy, svd = merge_experts(experts, "svd_copy", rank=2), merge_experts(experts, "svd", rank=2)  # type: ignore[arg-type]
    name = "unet.mid_block.attentions.0.proj_in"
    assert torch.equal(copy.modules[name].up, svd.modules[name].up)
    assert json.loads(copy.metadata["selma.merge"])["method"] == "svd_copy"
