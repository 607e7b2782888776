"""Tiny, offline stand-ins for the CLIP vision setup: a random tiny CLIP (with tokenizer and image
processor) and tiny image datasets in the Hub format (`image` PIL column + `label` ClassLabel).

Used by the tests and by anyone who wants to exercise the recipe end to end without a GPU or the
Hub: `python -m saft_hf.testing.vision OUT_DIR` writes `OUT_DIR/clip` and `OUT_DIR/data/<task>`.
The datasets carry a learnable signal (class-dependent colour or stripe pattern plus noise).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

TINY_TASKS = {
    # task name (a real task of the benchmark, so its templates / class-name rules apply) -> classes
    "eurosat": ["AnnualCrop", "Forest", "River", "SeaLake"],
    "dtd": ["banded", "chequered", "dotted", "striped"],
}


def _byte_chars() -> list[str]:
    # The GPT-2 / CLIP byte-to-unicode table: printable bytes map to themselves, the rest upward.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_tiny_clip(output_dir: str | Path, image_size: int = 32, patch_size: int = 8, hidden: int = 32,
                    projection_dim: int = 16, seed: int = 0) -> Path:
    """Save a random tiny `CLIPModel` + `CLIPTokenizer` (byte-level, no merges) + image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    output_dir = Path(output_dir)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in _byte_chars():
        for tok in (ch, ch + "</w>"):
            vocab.setdefault(tok, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    layer = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, **layer),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **layer),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def _image(task: str, label: int, rng: np.random.Generator, size: int):
    from PIL import Image

    if task == "eurosat":  # colour task, RGB
        palette = np.array([[200, 180, 60], [30, 140, 40], [60, 90, 200], [20, 40, 120]], dtype=np.float32)
        base = np.broadcast_to(palette[label % len(palette)], (size, size, 3))
        pixels = base + rng.normal(0, 25, (size, size, 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    # texture task, greyscale ("L") like MNIST: horizontal / checker / dots / vertical stripes
    y, x = np.mgrid[0:size, 0:size]
    period = 6
    pattern = [(y // period) % 2, ((y // period) + (x // period)) % 2,
               ((y % period < 2) & (x % period < 2)), (x // period) % 2][label % 4]
    pixels = 60 + 140 * pattern.astype(np.float32) + rng.normal(0, 20, (size, size))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L")


def build_tiny_dataset(task: str, output_dir: str | Path, train_per_class: int = 40, test_per_class: int = 12,
                       image_size: int = 40, seed: int = 0) -> Path:
    """Write a `DatasetDict` (train, test) with `image` + `label` (ClassLabel) via `save_to_disk`."""
    import datasets

    names = TINY_TASKS[task]
    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    splits = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = [c for c in range(len(names)) for _ in range(per_class)]
        rng.shuffle(labels)
        splits[split] = datasets.Dataset.from_dict(
            {"image": [_image(task, c, rng, image_size) for c in labels], "label": labels}, features=features)
    output_dir = Path(output_dir)
    datasets.DatasetDict(splits).save_to_disk(str(output_dir))
    return output_dir


def build_tiny_setup(root: str | Path) -> dict:
    """Tiny CLIP at `root/clip` and every tiny task dataset at `root/data/<task>`."""
    root = Path(root)
    clip = build_tiny_clip(root / "clip")
    data = {task: build_tiny_dataset(task, root / "data" / task, seed=i) for i, task in enumerate(TINY_TASKS)}
    return {"clip": clip, "data": data}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m saft_hf.testing.vision OUT_DIR")
    print(build_tiny_setup(sys.argv[1]))
