"""Merging LoRA experts into one LoRA: the public import path of :mod:`selma_toolkit.lora.merging`.

Every method, exactly, in that one package: the formulas (``merging/formulas.py``), the checks,
the merge record (``merging/record.py``) and ``merge_experts`` / ``merge_files``
(``merging/api.py``), with the method table (``selma_toolkit/config/merge_methods.py``). This
module only re-exports them.
"""

from selma_toolkit.config.merge_methods import (
    DENSITY_METHODS,
    FACTORED_METHODS,
    LINEAR_METHODS,
    MERGE_METHODS,
    METHODS,
    SEED_METHODS,
    MergeMethod,
    MethodSpec,
    SvdMode,
    method_spec,
)
from selma_toolkit.lora.merging.api import merge_experts, merge_files
from selma_toolkit.lora.merging.checks import expert_weights
from selma_toolkit.lora.merging.formulas import apply_block_weights
from selma_toolkit.lora.merging.record import (
    MERGE_METADATA_KEY,
    MergeRecord,
    expert_info,
    file_source,
    merge_record,
    metadata_record,
    record_metadata,
)

__all__ = [
    "DENSITY_METHODS",
    "FACTORED_METHODS",
    "LINEAR_METHODS",
    "MERGE_METADATA_KEY",
    "MERGE_METHODS",
    "METHODS",
    "SEED_METHODS",
    "MergeMethod",
    "MergeRecord",
    "MethodSpec",
    "SvdMode",
    "apply_block_weights",
    "expert_info",
    "expert_weights",
    "file_source",
    "merge_experts",
    "merge_files",
    "merge_record",
    "metadata_record",
    "method_spec",
    "record_metadata",
]
