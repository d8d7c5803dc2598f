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
    "merge_experts", "merge_files", "expert_weights", "apply_block_weights",
    "METHODS", "MERGE_METHODS", "FACTORED_METHODS", "LINEAR_METHODS", "DENSITY_METHODS", "SEED_METHODS",
    "MergeMethod", "MethodSpec", "SvdMode", "method_spec",
    "MERGE_METADATA_KEY", "MergeRecord", "expert_info", "file_source", "merge_record", "metadata_record", "record_metadata",
]
