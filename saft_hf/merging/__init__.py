"""Model merging: task vectors, every registered merge method (weighted average, task arithmetic,
TIES, ... - see `saft_hf.merging.registry`) with transforms (DARE, ...), coefficient search, and a
streamed on-disk merge (`merge_models`, `saft-hf merge`)."""
from . import registry
from .api import (adamerging, dare, fisher_merging, merge, merge_finetuned, regmean, task_arithmetic, task_vector,
                  ties_merging, weighted_average)
from .data import MergeData
from .io import CheckpointError, open_source
from .pipeline import MergeConfig, merge_models
from .search import SearchResult, search_coefficients
from .topk import exact_kth_abs

__all__ = [
    "CheckpointError", "MergeConfig", "MergeData", "SearchResult", "adamerging", "dare", "exact_kth_abs",
    "fisher_merging", "merge", "merge_finetuned", "merge_models", "open_source", "registry", "regmean",
    "search_coefficients", "task_arithmetic", "task_vector", "ties_merging", "weighted_average",
]
