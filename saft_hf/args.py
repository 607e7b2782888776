"""Training arguments with the sharpness-aware (SAM / ASAM) knobs of SAFT.

The knobs are defined once, in `SharpnessArgumentsMixin`, and mixed into both
`TrainingArguments` and `Seq2SeqTrainingArguments`. Every knob is a dataclass field with
help text, so `HfArgumentParser` (command line, JSON, YAML) picks them up unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Seq2SeqTrainingArguments, TrainingArguments

SAM_SCOPES = ("all", "weights")


@dataclass
class SharpnessArgumentsMixin:
    """SAM / ASAM hyper-parameters shared by the plain and the Seq2Seq arguments."""

    sam_rho: float = field(
        default=0.5,
        metadata={
            "help": "Radius rho of the sharpness-aware perturbation (the SAFT paper uses 0.5 for ASAM, "
            "0.05 for plain SAM). 0 disables SAM: the trainer then behaves exactly like `Trainer`."
        },
    )
    sam_adaptive: bool = field(
        default=True,
        metadata={"help": "Use adaptive SAM (ASAM, scale-invariant, T_w = |w| + eta). False gives plain SAM."},
    )
    sam_eta: float = field(
        default=0.0,
        metadata={
            "help": "ASAM's eta in T_w = |w| + eta (>= 0). The SAFT paper code uses 0, the official ASAM code 0.01."
        },
    )
    sam_scope: str = field(
        default="all",
        metadata={
            "help": "Which tensors ASAM rescales: 'all' (T = |w| + eta for every trainable tensor, as in the SAFT "
            "paper's code) or 'weights' (official ASAM convention: only tensors whose name ends in 'weight'; "
            "T = 1 for biases and the rest).",
            "choices": list(SAM_SCOPES),
        },
    )
    sam_sync_perturbation: bool = field(
        default=False,
        metadata={
            "help": "Multi-process training: all-reduce (mean) the first-pass gradient before computing the "
            "perturbation, so every rank uses the same one. Default False: each rank perturbs from its own "
            "micro-batch gradient (m-sharpness, as google-research/sam). DeepSpeed ZeRO-3 always syncs."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        validate_sharpness_arguments(self)

    @property
    def sam_enabled(self) -> bool:
        return self.sam_rho > 0


def validate_sharpness_arguments(args) -> None:
    """Raise a ValueError naming the bad SAM knob and how to fix it."""
    if not isinstance(args.sam_rho, (int, float)) or args.sam_rho != args.sam_rho or args.sam_rho < 0:
        raise ValueError(f"sam_rho must be a number >= 0 (0 disables SAM), got {args.sam_rho!r}.")
    if not isinstance(args.sam_eta, (int, float)) or args.sam_eta != args.sam_eta or args.sam_eta < 0:
        raise ValueError(f"sam_eta must be a number >= 0 (ASAM uses 0 or 0.01), got {args.sam_eta!r}.")
    if args.sam_scope not in SAM_SCOPES:
        raise ValueError(f"sam_scope must be one of {SAM_SCOPES}, got {args.sam_scope!r}.")
    if args.sam_eta > 0 and not args.sam_adaptive:
        raise ValueError(
            f"sam_eta={args.sam_eta} only affects ASAM; with sam_adaptive=False set sam_eta=0 "
            "(or set sam_adaptive=True)."
        )


@dataclass
class SAFTTrainingArguments(SharpnessArgumentsMixin, TrainingArguments):
    """`TrainingArguments` plus the SAM / ASAM knobs (`sam_*`) used by `SAFTTrainer`."""


@dataclass
class SAFTSeq2SeqTrainingArguments(SharpnessArgumentsMixin, Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` plus the SAM / ASAM knobs (`sam_*`) used by `SAFTSeq2SeqTrainer`."""
