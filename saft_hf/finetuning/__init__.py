"""Which parameters fine-tune: full, FTLO (attention linear layers only), FTTS (linearized), LoRA (peft)."""

# full / FTLO parameter selection and FTTS (linearized) wrapper (vision helper).
from saft_hf.finetuning.linearized import LinearizedModel, LinearizedOutput  # noqa: E402,F401
from saft_hf.finetuning.partial import (  # noqa: E402,F401
    ATTENTION_LINEAR_PATTERNS,
    FINETUNING_MODES,
    apply_finetuning_mode,
    attention_linear_modules,
    count_parameters,
    ftlo_parameter_names,
)
