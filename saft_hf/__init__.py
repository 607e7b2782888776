"""saft-hf: sharpness-aware fine-tuning (SAFT) for the Hugging Face Trainer, made for model merging.

The public names are imported lazily so that `import saft_hf` (and the CLI) stays fast and
never touches transformers until a trainer is actually used.
"""

__version__ = "0.1.0"

_LAZY = {
    "SAFTTrainer": "saft_hf.trainer",
    "SAFTSeq2SeqTrainer": "saft_hf.trainer",
    "SAFTTrainingArguments": "saft_hf.args",
    "SAFTSeq2SeqTrainingArguments": "saft_hf.args",
    "MergeMonitorCallback": "saft_hf.callbacks",
    "SAFTTrainerMixin": "saft_hf.trainer",
    "SharpnessArgumentsMixin": "saft_hf.args",
    "with_sam": "saft_hf.wrap",
    "with_sam_args": "saft_hf.wrap",
}
_LAZY_MODULES = ("stats",)  # `saft_hf.stats.paired_bootstrap(...)` without importing numpy up front

__all__ = sorted(_LAZY) + list(_LAZY_MODULES) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f"saft_hf.{name}")
    raise AttributeError(f"module 'saft_hf' has no attribute {name!r}")
