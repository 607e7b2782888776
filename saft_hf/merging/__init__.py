"""Model merging: task vectors, every registered merge method (weighted average, task arithmetic,
TIES, ... - see `saft_hf.merging.registry`) with transforms (DARE, ...), coefficient search, and a
streamed on-disk merge (`merge_models`, `saft-hf merge`)."""
from . import registry
from .api import (adamerging, breadcrumbs, dare, della, fisher_merging, iso_c, iso_cts, merge, merge_finetuned,
                  model_stock, regmean, slerp, task_arithmetic, task_vector, ties_merging, tsv_merging,
                  weighted_average)
from .data import MergeData
from .io import CheckpointError, open_source
from .pipeline import MergeConfig, merge_models
from .search import SearchResult, search_coefficients
from .topk import exact_kth_abs

__all__ = [
    "CheckpointError", "MergeConfig", "MergeData", "SearchResult", "adamerging", "breadcrumbs", "dare", "della",
    "exact_kth_abs", "fisher_merging", "iso_c", "iso_cts", "merge", "merge_finetuned", "merge_models",
    "model_stock", "open_source", "registry", "regmean", "search_coefficients", "slerp", "task_arithmetic",
    "task_vector", "ties_merging", "tsv_merging", "weighted_average",
]
