"""CLIP image encoders and their frozen per-task zero-shot heads.

The trainable model of a task is `EncoderClassifier(CLIPVisionModelWithProjection, ZeroShotHead,
"clip_image")`. Heads are built from the pretrained CLIP text tower once and cached on disk, keyed
by the model, the task, its class names and its templates (a change in any gives a new file).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import torch

from saft_hf.heads import EncoderClassifier, ZeroShotHead, zero_shot_weights
from saft_hf.tasks.vision import VisionTask

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
# Short names users may type; any Hub name or local directory also works.
CLIP_MODELS = {
    "ViT-B-32": "openai/clip-vit-base-patch32",
    "ViT-B-16": "openai/clip-vit-base-patch16",
    "ViT-L-14": "openai/clip-vit-large-patch14",
}


def resolve_model_name(name: str) -> str:
    return CLIP_MODELS.get(name.replace("/", "-"), name) if name else DEFAULT_CLIP_MODEL


def default_head_cache_dir() -> Path:
    root = os.environ.get("SAFT_HF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "saft_hf")
    return Path(root) / "heads"


def load_vision_encoder(model_name_or_path: str, attn_implementation: str | None = None, dtype=None):
    """`CLIPVisionModelWithProjection` from a full CLIP checkpoint or a saved vision-only one."""
    from transformers import CLIPVisionModelWithProjection

    kwargs = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    name = resolve_model_name(model_name_or_path)
    config = clip_config(name)
    if config.model_type == "clip":
        # A full CLIP checkpoint: the projection size is a top-level field that the vision sub-config
        # does not always repeat (its own default is 512; ViT-L/14 projects to 768).
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
        kwargs["config"] = vision_config
        # The text tower's weights are expected to be left out: silence transformers' load report
        # (a real problem, e.g. a shape mismatch, still raises).
        with _transformers_log_level(logging.ERROR):
            return CLIPVisionModelWithProjection.from_pretrained(name, **kwargs)
    return CLIPVisionModelWithProjection.from_pretrained(name, **kwargs)


CLIP_MODEL_TYPES = ("clip", "clip_vision_model")


def clip_config(name: str, what: str = "model", full: bool = False):
    """The config of CLIP checkpoint `name`; a missing path, an unreachable Hub name, or another
    architecture (BERT, ViT, ...) is refused with a message naming it. `full`: the text tower is
    needed too (zero-shot heads), so a vision-only checkpoint is refused."""
    from transformers import AutoConfig

    from saft_hf.model_paths import hub_load_errors

    with hub_load_errors(name, what):
        config = AutoConfig.from_pretrained(name)
    kinds = ("clip",) if full else CLIP_MODEL_TYPES
    if config.model_type not in kinds:
        need = ("a full CLIP checkpoint (CLIPModel: image and text towers, for the zero-shot heads)" if full else
                "a CLIP image encoder (CLIPVisionModelWithProjection, as the vision recipe and `saft-hf merge` "
                "write) or a full CLIP checkpoint")
        raise ValueError(f"{what} {name} is a {config.model_type!r} checkpoint; the vision family needs {need}")
    return config


@contextlib.contextmanager
def _transformers_log_level(level: int):
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity(level)
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def load_image_processor(model_name_or_path: str):
    """The model's `CLIPImageProcessor` (PIL backend when torchvision is absent)."""
    from transformers import AutoImageProcessor

    from saft_hf.model_paths import hub_load_errors

    name = resolve_model_name(model_name_or_path)
    with hub_load_errors(name, "base model"):
        return AutoImageProcessor.from_pretrained(name)


def head_cache_path(model_name_or_path: str, task: VisionTask, class_names: Sequence[str],
                    cache_dir: str | os.PathLike | None = None) -> Path:
    model_id = resolve_model_name(model_name_or_path)
    if os.path.isdir(model_id):
        model_id = os.path.abspath(model_id)
    digest = hashlib.sha256(
        "\x1f".join([model_id, task.name, *task.templates, "\x1e", *class_names]).encode()
    ).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_id.strip("/"))[-60:]
    return Path(cache_dir or default_head_cache_dir()) / f"{slug}__{task.name}__{digest}.safetensors"


@torch.no_grad()
def build_zero_shot_head(model_name_or_path: str, task: VisionTask, class_names: Sequence[str],
                         cache_dir: str | os.PathLike | None = None, device: str | torch.device | None = None,
                         batch_size: int = 256) -> ZeroShotHead:
    """The task's frozen head from the CLIP text tower of `model_name_or_path`, cached on disk.

    Rows: for each class, the templates filled with its name, embedded, L2-normalized, averaged,
    normalized again, times exp(logit_scale) (`saft_hf.heads.zero_shot_weights`).
    """
    path = head_cache_path(model_name_or_path, task, class_names, cache_dir)
    if path.exists():
        head = ZeroShotHead.load(path)
        if head.num_classes == len(class_names):
            return head
        logger.warning("cached head %s has %d classes, expected %d; rebuilding", path, head.num_classes, len(class_names))
    from transformers import AutoTokenizer, CLIPModel

    name = resolve_model_name(model_name_or_path)
    clip_config(name, "base model", full=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    clip = CLIPModel.from_pretrained(name).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(name)
    max_length = clip.config.text_config.max_position_embeddings

    def embed(prompts: list[str]) -> torch.Tensor:
        chunks = []
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt").to(device)
            out = clip.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            chunks.append((out if isinstance(out, torch.Tensor) else out.pooler_output).float().cpu())
        return torch.cat(chunks)

    weight = zero_shot_weights(embed, list(class_names), task.templates, clip.logit_scale.exp().item())
    head = ZeroShotHead(weight)
    head.save(path)  # atomic
    logger.info("built zero-shot head for %s (%d classes) -> %s", task.name, len(class_names), path)
    del clip
    return head


def build_classifier(encoder: torch.nn.Module, head: ZeroShotHead) -> EncoderClassifier:
    return EncoderClassifier(encoder, head, "clip_image")


def save_pretrained_vision_encoder(model_name_or_path: str, output_dir: str | os.PathLike) -> Path:
    """Write the pretrained image encoder (+ image processor) as its own HF directory: the theta0
    that task vectors are taken against, in the same key layout as the fine-tuned checkpoints."""
    from saft_hf.io_utils import atomic_directory

    output_dir = Path(output_dir)
    encoder = load_vision_encoder(model_name_or_path)
    processor = load_image_processor(model_name_or_path)
    with atomic_directory(output_dir, overwrite=True, inputs=[model_name_or_path]) as tmp:
        encoder.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return output_dir
