"""Model merging: task vectors, weighted average, task arithmetic, TIES, DARE, coefficient
search, and a streamed on-disk merge (`merge_models`, `saft-hf merge`)."""
from .io import CheckpointError, open_source
from .methods import dare, task_arithmetic, task_vector, ties_merging, weighted_average
from .pipeline import MergeConfig, merge_models
from .search import SearchResult, search_coefficients
from .topk import exact_kth_abs

__all__ = [
    "CheckpointError", "MergeConfig", "SearchResult", "dare", "exact_kth_abs", "merge_models", "open_source",
    "search_coefficients", "task_arithmetic", "task_vector", "ties_merging", "weighted_average",
]
