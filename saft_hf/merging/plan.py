"""Which keys get merged: floating-point keys of the pretrained model, tied weights merged once,
integer/bool buffers copied from the pretrained model unchanged."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch

from .io import TensorSource

logger = logging.getLogger(__name__)

# Names that HF models tie (T5 shared/embed_tokens/lm_head, BERT word embeddings / MLM decoder,
# GPT-2 wte, CLIP token embeddings). Only these are compared by value to find ties on disk.
_TIE_CANDIDATE = re.compile(r"(shared|embed_tokens|word_embeddings|token_embedding|wte|lm_head|embed_out|predictions\.decoder)\.weight$")


@dataclass
class MergePlan:
    keys: list[str]  # floating-point keys merged, one per tie group
    passthrough: list[str]  # non-float keys copied from the pretrained model
    aliases: dict[str, str] = field(default_factory=dict)  # tied alias -> merged key
    notes: list[str] = field(default_factory=list)


def _value_tie_groups(source: TensorSource, keys: list[str]) -> list[list[str]]:
    candidates: dict[tuple, list[str]] = {}
    for k in keys:
        if _TIE_CANDIDATE.search(k):
            candidates.setdefault(source.info(k), []).append(k)
    groups = []
    for same in candidates.values():
        while len(same) > 1:
            head, rest = same[0], same[1:]
            ref = source.get(head)
            group = [head] + [k for k in rest if torch.equal(ref, source.get(k))]
            if len(group) > 1:
                groups.append(group)
            same = [k for k in rest if k not in group]
    return groups


def build_plan(base: TensorSource, others: list[TensorSource] = ()) -> MergePlan:
    """Tie groups: keys sharing storage in memory, or tie-candidate keys with identical values in
    the pretrained model and in every other model holding both (checkpoints on disk keep only
    one copy of a tied weight when saved by save_pretrained; then there is nothing to detect)."""
    keys = base.keys()
    floating, passthrough = [], []
    for k in keys:
        (floating if base.info(k)[1].is_floating_point else passthrough).append(k)
    groups = base.storage_groups() or _value_tie_groups(base, floating)
    aliases: dict[str, str] = {}
    for g in groups:
        g = [k for k in g if k in floating]
        if len(g) < 2:
            continue
        canonical, rest = g[0], g[1:]
        tied = True
        for other in others:
            own = set(other.keys())
            for k in rest:
                if k in own and canonical in own and not (
                    other.storage_groups() or torch.equal(other.get(k), other.get(canonical))
                ):
                    tied = False
        if tied:
            for k in rest:
                aliases[k] = canonical
    plan = MergePlan([k for k in floating if k not in aliases], passthrough, aliases)
    if aliases:
        by_canon: dict[str, list[str]] = {}
        for a, c in aliases.items():
            by_canon.setdefault(c, []).append(a)
        for c, al in by_canon.items():
            plan.notes.append(f"tied weights {[c] + al} merged once (as {c!r})")
    for note in plan.notes:
        logger.info(note)
    return plan


def check_extra_keys(plan: MergePlan, base: TensorSource, other: TensorSource) -> list[str]:
    """Keys in a fine-tuned checkpoint but not in the pretrained one: allowed only as tied copies."""
    known = set(base.keys()) | set(plan.aliases)
    extra = [k for k in other.keys() if k not in known]
    notes = []
    for k in extra:
        partners = [c for c in plan.keys if _TIE_CANDIDATE.search(k) and _TIE_CANDIDATE.search(c)
                    and c in other and other.info(c) == other.info(k) and torch.equal(other.get(c), other.get(k))]
        if not partners:
            from .io import CheckpointError

            raise CheckpointError(
                f"key {k!r} is in {other.name} but not in the pretrained model; both must have the same architecture"
            )
        notes.append(f"{other.name}: {k!r} is a tied copy of {partners[0]!r}; merged once")
    return notes
