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
    "SAFTTrainerMixin": "saft_hf.trainer",
    "SharpnessArgumentsMixin": "saft_hf.args",
    "with_sam": "saft_hf.wrap",
    "with_sam_args": "saft_hf.wrap",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'saft_hf' has no attribute {name!r}")
