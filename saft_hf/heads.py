"""Frozen zero-shot classification heads, as in the SAFT paper's CLIP setup.

A head is the matrix of class embeddings: for each class, embed every prompt template filled with
the class name, L2-normalize each embedding, average over templates, normalize again, and multiply
by the logit scale. Logits are `normalize(features) @ W.T`. The head never trains, so task vectors
(and merged encoders) only involve the encoder, and every task's head works with a merged encoder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

EmbedFn = Callable[[list[str]], torch.Tensor]


@torch.no_grad()
def zero_shot_weights(
    embed_texts: EmbedFn,
    class_names: Sequence[str],
    templates: Sequence[str],
    logit_scale: float,
) -> torch.Tensor:
    """Return the `[num_classes, dim]` head matrix.

    `embed_texts(list_of_strings) -> [n, dim]` embeds prompts with the (pretrained) text encoder;
    each template is a format string with one `{}` (or `{c}`) for the class name.
    """
    if not class_names:
        raise ValueError("zero_shot_weights: class_names is empty")
    if not templates:
        raise ValueError("zero_shot_weights: templates is empty; give at least one prompt template such as '{}'")
    rows = []
    for name in class_names:
        prompts = [_fill(t, name) for t in templates]
        emb = F.normalize(embed_texts(prompts).float(), dim=-1)
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows) * float(logit_scale)


def _fill(template: str, class_name: str) -> str:
    if "{c}" in template:
        return template.replace("{c}", class_name)
    if "{}" in template:
        return template.format(class_name)
    raise ValueError(f"prompt template {template!r} has no '{{}}' placeholder for the class name")


class ZeroShotHead(nn.Module):
    """Frozen linear head on normalized features; the weight is a buffer, never a parameter."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().float(), persistent=True)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = F.normalize(features.float(), dim=-1)
        return features @ self.weight.t()

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        from saft_hf.io_utils import atomic_path

        with atomic_path(path) as tmp:
            save_file({"weight": self.weight.contiguous()}, str(tmp), metadata={"format": "saft_hf.zero_shot_head"})

    @classmethod
    def load(cls, path: str | Path) -> "ZeroShotHead":
        from safetensors.torch import load_file

        return cls(load_file(str(path))["weight"])


# --- encoder + frozen head, the trainable model of every classification family -------------------


def mean_pooled_text_features(encoder: nn.Module, inputs: dict) -> torch.Tensor:
    """Sentence-transformers style: mean of the last hidden states over non-padding tokens."""
    out = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  **({"token_type_ids": inputs["token_type_ids"]} if "token_type_ids" in inputs else {}))
    hidden = out.last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


def clip_image_features(encoder: nn.Module, inputs: dict) -> torch.Tensor:
    """CLIP image embeddings (after the visual projection) from `CLIPVisionModelWithProjection`."""
    return encoder(pixel_values=inputs["pixel_values"]).image_embeds


FEATURE_FUNCTIONS: dict[str, Callable[[nn.Module, dict], torch.Tensor]] = {
    "mean_pooled_text": mean_pooled_text_features,
    "clip_image": clip_image_features,
}


class EncoderClassifier(nn.Module):
    """A trainable encoder with a frozen `ZeroShotHead`: what `SAFTTrainer` fine-tunes per task.

    `forward(**inputs, labels=None)` returns `{"loss", "logits"}` (cross-entropy when labels are
    given), so it drops into `Trainer`. Only `encoder.*` parameters exist; the head is a buffer.
    Save the encoder alone (`model.encoder.save_pretrained`) for merging.
    """

    def __init__(self, encoder: nn.Module, head: ZeroShotHead, features: str):
        super().__init__()
        if features not in FEATURE_FUNCTIONS:
            raise ValueError(f"unknown feature function {features!r}; choose one of {sorted(FEATURE_FUNCTIONS)}")
        self.encoder = encoder
        self.head = head
        self.features = features

    def forward(self, labels: torch.Tensor | None = None, **inputs):
        logits = self.head(FEATURE_FUNCTIONS[self.features](self.encoder, inputs))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out
