"""The paper's 8 CLIP vision tasks: where the data lives, how its columns are named, what the
classes are called in prompts, and which prompt templates build each zero-shot head.

This module is the single source of truth for those facts; recipes and evaluators look tasks up
with `get_vision_task(name)` and never repeat them. Prompt templates follow the CLIP paper's
per-dataset prompt engineering (also used by the task-vectors / TIES / SAFT code bases), written
out here. Class names come from the dataset's `ClassLabel` feature by default, cleaned for prompts
(`_` -> space, CamelCase split); a task can rename classes by name (`class_name_map`) or, when the
Hub only gives numeric ids, supply the whole list by index (`class_names_by_index`).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Sequence

# --- prompt templates -----------------------------------------------------------------------------

_NUMBER_TEMPLATES = ('a photo of the number: "{}".',)

_CARS_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of my {}.",
    "i love my {}!",
    "a photo of my dirty {}.",
    "a photo of my clean {}.",
    "a photo of my new {}.",
    "a photo of my old {}.",
)

_DTD_TEMPLATES = (
    "a photo of a {} texture.",
    "a photo of a {} pattern.",
    "a photo of a {} thing.",
    "a photo of a {} object.",
    "a photo of the {} texture.",
    "a photo of the {} pattern.",
    "a photo of the {} thing.",
    "a photo of the {} object.",
)

_EUROSAT_TEMPLATES = (
    "a centered satellite photo of {}.",
    "a centered satellite photo of a {}.",
    "a centered satellite photo of the {}.",
)

_GTSRB_TEMPLATES = (
    'a zoomed in photo of a "{}" traffic sign.',
    'a centered photo of a "{}" traffic sign.',
    'a close up photo of a "{}" traffic sign.',
)

_RESISC45_TEMPLATES = tuple(
    f"{kind} {view} of {article}{{}}."
    for article in ("", "a ", "the ")
    for view in ("imagery", "photo", "view")
    for kind in ("satellite", "aerial")
)

_SUN397_TEMPLATES = ("a photo of a {}.", "a photo of the {}.")

# --- class names the Hub gets wrong for prompting -------------------------------------------------

# EuroSAT folder names -> the descriptive names CLIP was prompted with.
_EUROSAT_NAMES = {
    "annualcrop": "annual crop land",
    "forest": "forest",
    "herbaceousvegetation": "brushland or shrubland",
    "highway": "highway or road",
    "industrial": "industrial buildings or commercial buildings",
    "pasture": "pasture land",
    "permanentcrop": "permanent crop land",
    "residential": "residential buildings or homes or apartments",
    "river": "river",
    "sealake": "lake or sea",
}

# GTSRB class ids 0..42 -> descriptions of the sign (the Hub and the original data only give ids).
_GTSRB_NAMES = (
    "red and white circle 20 kph speed limit",
    "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit",
    "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit",
    "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit",
    "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit",
    "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing",
    "red and white triangle road intersection warning",
    "white and yellow diamond priority road",
    "red and white upside down triangle yield right-of-way",
    "stop",
    "empty red and white circle",
    "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry",
    "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning",
    "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning",
    "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit",
    "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory",
    "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory",
    "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
)

_DIGITS = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class VisionTask:
    """One image-classification task of the benchmark.

    `dataset` is a Hub name (or anything `datasets.load_dataset` accepts); pass a local path at load
    time to override it. `train_split` / `test_split` name the splits; validation is carved from
    train (see `saft_hf.vision.data`).
    """

    name: str
    dataset: str
    num_classes: int
    templates: tuple[str, ...]
    config: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    class_name_map: dict[str, str] = field(default_factory=dict)
    class_names_by_index: tuple[str, ...] | None = None

    def class_names(self, raw_names: Sequence[str]) -> list[str]:
        """Prompt-ready class names for a dataset whose `ClassLabel` names are `raw_names`.

        The index list is used when the dataset's names are only ids (all digits) or when they
        cannot be mapped by name; it must then have exactly one entry per class.
        """
        raw_names = [str(n) for n in raw_names]
        if self.class_names_by_index is not None and len(raw_names) == len(self.class_names_by_index):
            if all(n.strip().isdigit() for n in raw_names):
                return [self.class_names_by_index[int(n)] for n in raw_names]
            if not self.class_name_map and not _looks_descriptive(raw_names):
                return list(self.class_names_by_index)
        return [self.class_name_map.get(_key(n), clean_class_name(n)) for n in raw_names]

    def templates_hash(self) -> str:
        return hashlib.sha256("\n".join(self.templates).encode()).hexdigest()[:12]


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _looks_descriptive(names: Sequence[str]) -> bool:
    return any(re.search(r"[a-zA-Z]{3,}", n) for n in names)


def clean_class_name(name: str) -> str:
    """`"AnnualCrop"` -> `"annual crop"`, `"baseball_diamond"` -> `"baseball diamond"`,
    `"/a/airplane_cabin"` -> `"airplane cabin"` (SUN397 paths); digits and clean names stay."""
    name = str(name).strip()
    name = re.sub(r"^/[a-z]/", "", name)  # SUN397 raw names look like "/a/abbey" or "/b/bakery/shop"
    name = name.replace("/", " ").replace("_", " ")
    if re.fullmatch(r"[A-Za-z]+", name) and re.search(r"[a-z][A-Z]", name):
        name = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).lower()
    return re.sub(r"\s+", " ", name).strip()


VISION_TASKS: dict[str, VisionTask] = {
    task.name: task
    for task in (
        VisionTask("cars", "tanganke/stanford_cars", 196, _CARS_TEMPLATES),
        VisionTask("dtd", "tanganke/dtd", 47, _DTD_TEMPLATES),
        VisionTask("eurosat", "tanganke/eurosat", 10, _EUROSAT_TEMPLATES, class_name_map=_EUROSAT_NAMES),
        VisionTask("gtsrb", "tanganke/gtsrb", 43, _GTSRB_TEMPLATES, class_names_by_index=_GTSRB_NAMES),
        VisionTask("mnist", "ylecun/mnist", 10, _NUMBER_TEMPLATES, class_names_by_index=_DIGITS),
        VisionTask("resisc45", "tanganke/resisc45", 45, _RESISC45_TEMPLATES),
        VisionTask("sun397", "tanganke/sun397", 397, _SUN397_TEMPLATES),
        VisionTask("svhn", "ufldl-stanford/svhn", 10, _NUMBER_TEMPLATES, config="cropped_digits",
                   class_names_by_index=_DIGITS),
    )
}

# Aliases users type (paper table headers, dataset names).
_ALIASES = {"stanford_cars": "cars", "stanfordcars": "cars", "sun": "sun397", "resisc": "resisc45"}

PAPER_TASKS = ("cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn")


def get_vision_task(name: str) -> VisionTask:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in VISION_TASKS:
        raise KeyError(f"unknown vision task {name!r}; choose one of {sorted(VISION_TASKS)}")
    return VISION_TASKS[key]
