"""Training arguments with the sharpness-aware (SAM / ASAM / other variants) knobs of SAFT.

The knobs are defined once, in `SharpnessArgumentsMixin`, and mixed into both
`TrainingArguments` and `Seq2SeqTrainingArguments`. Every knob is a dataclass field with
help text, so `HfArgumentParser` (command line, JSON, YAML) picks them up unchanged. A variant in
`saft_hf.sam_variants` can add its own `sam_*` fields (its `arguments` dataclass is mixed in here).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

from transformers import Seq2SeqTrainingArguments, TrainingArguments

from . import sam_variants
from .argument_checks import check_bool, check_nonnegative, check_positive_int

SAM_SCOPES = ("all", "weights")
DEFAULT_SAM_VARIANT = "asam"
# the deprecated boolean alias: sam_adaptive=True -> "asam", False -> "sam"
_ADAPTIVE_ALIAS = {True: "asam", False: "sam"}


class _DefaultVariant(str):
    """The default sam_variant, marked so that an explicit `sam_variant="asam"` can be told apart from it
    (needed to reject `sam_variant="asam", sam_adaptive=False`). `__str__` returns the marked object so
    the mark survives argparse, which passes string defaults through `type=str`."""

    def __str__(self):
        return self


@dataclass
class _CoreSharpnessArguments:
    sam_rho: float = field(
        default=0.5,
        metadata={
            "help": "Radius rho of the sharpness-aware perturbation (default 0.5: ASAM's, as in the SAFT paper). "
            "The papers' radii: " + sam_variants.registry.paper_radii_text() + ". With sam_base_variant='asam' "
            "the variants built on plain SAM take ASAM's 0.5. 0 disables SAM: the trainer then behaves exactly "
            "like `Trainer`."
        },
    )
    sam_variant: str = field(
        default=_DefaultVariant(DEFAULT_SAM_VARIANT),
        metadata={
            "help": "Which sharpness-aware method: "
            + ", ".join(repr(n) for n in sam_variants.sam_variant_names())
            + " ('asam': adaptive SAM, T_w = |w| + eta, scale invariant; 'sam': plain SAM, T = 1). "
            "Variants are registered in saft_hf.sam_variants."
        },
    )
    sam_adaptive: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Deprecated alias of sam_variant: True = 'asam', False = 'sam'. Use sam_variant instead."
        },
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
            "paper's code) or 'weights' (official ASAM convention: only tensors whose name contains 'weight', "
            "incl. weight-norm's weight_g/weight_v and parametrizations.weight.original0/1; T = 1 for biases "
            "and the rest).",
            "choices": list(SAM_SCOPES),
        },
    )
    sam_interval: int = field(
        default=1,
        metadata={
            "help": "Take the sharpness-aware step (of any sam_variant) on every k-th optimizer step only, a plain "
            "single-pass step in between (MosaicML Composer's SAM `interval`): SAM on steps 0, k, 2k, ...; cost "
            "about 1 + 1/k plain steps. 1 (default): every step."
        },
    )
    sam_sync_perturbation: bool = field(
        default=False,
        metadata={
            "help": "Multi-process training: all-reduce (mean) the first-pass gradient before computing the "
            "perturbation, so every rank uses the same one. Default False: each rank perturbs from its own "
            "micro-batch gradient (m-sharpness, as google-research/sam). DeepSpeed ZeRO-3 and FSDP2 always sync "
            "(sharded weights)."
        },
    )


def build_sharpness_mixin(extra_argument_classes=()) -> type:
    """The arguments mixin: core knobs plus the `sam_*` fields of the given variant argument dataclasses."""

    @dataclass
    class SharpnessArgumentsMixin(*extra_argument_classes, _CoreSharpnessArguments):
        """SAM hyper-parameters shared by the plain and the Seq2Seq arguments (core knobs + the variants' own)."""

        def __post_init__(self):
            super().__post_init__()
            validate_sharpness_arguments(self)

        @property
        def sam_enabled(self) -> bool:
            return self.sam_rho > 0

    return SharpnessArgumentsMixin


SharpnessArgumentsMixin = build_sharpness_mixin(tuple(sam_variants.argument_classes()))


def _resolve_variant(args) -> None:
    """Apply the deprecated `sam_adaptive` alias to `sam_variant`, then clear it (it only carries input)."""
    adaptive = args.sam_adaptive
    explicit = not isinstance(args.sam_variant, _DefaultVariant)
    variant = str.__str__(args.sam_variant)  # a plain str from here on (pickles, compares, prints as usual)
    if adaptive is not None:
        implied = _ADAPTIVE_ALIAS[adaptive]
        if explicit and variant != implied:
            raise ValueError(
                f"sam_adaptive={adaptive} (deprecated alias of sam_variant={implied!r}) contradicts "
                f"sam_variant={variant!r}: drop sam_adaptive and keep sam_variant."
            )
        warnings.warn(
            f"sam_adaptive is deprecated and will be removed; use sam_variant={implied!r} instead of "
            f"sam_adaptive={adaptive}.",
            FutureWarning,
            stacklevel=5,  # the line that built the arguments
        )
        variant = implied
        args.sam_adaptive = None
    args.sam_variant = variant


def validate_sharpness_arguments(args) -> None:
    """Check type and range of every SAM knob; raise a ValueError naming the bad one and the fix."""
    check_nonnegative(args, "sam_rho")
    check_nonnegative(args, "sam_eta")
    check_bool(args, "sam_sync_perturbation")
    check_positive_int(args, "sam_interval")
    check_bool(args, "sam_adaptive", allow_none=True)
    if not isinstance(args.sam_scope, str) or args.sam_scope not in SAM_SCOPES:
        raise ValueError(f"sam_scope must be one of {SAM_SCOPES}, got {args.sam_scope!r}.")
    if not isinstance(args.sam_variant, str):
        raise ValueError(
            f"sam_variant must be a string, one of {sam_variants.sam_variant_names()}, got {args.sam_variant!r}."
        )
    _resolve_variant(args)
    sam_variants.get_sam_variant(args.sam_variant).validate_arguments(args)


@dataclass
class SAFTTrainingArguments(SharpnessArgumentsMixin, TrainingArguments):
    """`TrainingArguments` plus the SAM knobs (`sam_*`) used by `SAFTTrainer`."""


@dataclass
class SAFTSeq2SeqTrainingArguments(SharpnessArgumentsMixin, Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` plus the SAM knobs (`sam_*`) used by `SAFTSeq2SeqTrainer`."""
