"""The 8 GLUE tasks as text-to-text problems for Flan-T5: one prompt template and label words each.

This module is the single definition of a GLUE task in the project (recipes, evaluation and
tests read it; none repeats a prompt or a label word). A classification label `i` is trained as
the target text `label_words[i]`; a generation is mapped back by exact match of its normalized
text (lower case, whitespace removed) against the label words, anything else is "unparseable"
and counts as wrong.

STS-B (a regression task, scores in [0, 5]) follows T5: the target is the score rounded to the
nearest 0.2 and printed with one decimal ("0.0", "0.2", ..., "5.0"); a generation is parsed as a
number and clipped to [0, 5]. An unparseable STS-B generation is scored as 0.0 (the lowest
similarity, so it can only hurt the correlation) and counted in `unparseable_rate`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

GLUE_HUB_DATASET = "nyu-mll/glue"
STSB_MIN, STSB_MAX, STSB_STEP = 0.0, 5.0, 0.2
UNPARSEABLE = -1  # class index of a generation that matches no label word
STSB_UNPARSEABLE_VALUE = 0.0


@dataclass(frozen=True)
class GlueTask:
    name: str
    text_columns: tuple[str, ...]
    template: str  # str.format template over the text columns
    label_words: tuple[str, ...] | None  # label index -> target text; None for the regression task
    glue_metrics: tuple[str, ...]  # the task's own GLUE metrics (saft_hf.metrics names)
    train_split: str = "train"
    validation_split: str = "validation"
    hub_config: str = ""
    is_regression: bool = False
    default_score: str = "accuracy"  # the number averaged and normalized across tasks
    label_names: tuple[str, ...] = field(default=())  # GLUE's ClassLabel names, for documentation

    @property
    def num_labels(self) -> int | None:
        return None if self.is_regression else len(self.label_words)

    @property
    def config_name(self) -> str:
        return self.hub_config or self.name


_PAIR_SAME = "Do these two sentences mean the same thing? Answer yes or no.\nSentence 1: {sentence1}\nSentence 2: {sentence2}"

GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(
        name="cola",
        text_columns=("sentence",),
        template="Is the following sentence grammatically acceptable? Answer acceptable or unacceptable.\n"
        "Sentence: {sentence}",
        label_words=("unacceptable", "acceptable"),
        label_names=("unacceptable", "acceptable"),
        glue_metrics=("matthews_correlation", "accuracy"),
    ),
    "sst2": GlueTask(
        name="sst2",
        text_columns=("sentence",),
        template="What is the sentiment of this movie review? Answer positive or negative.\nReview: {sentence}",
        label_words=("negative", "positive"),
        label_names=("negative", "positive"),
        glue_metrics=("accuracy",),
    ),
    "mrpc": GlueTask(
        name="mrpc",
        text_columns=("sentence1", "sentence2"),
        template=_PAIR_SAME,
        label_words=("no", "yes"),
        label_names=("not_equivalent", "equivalent"),
        glue_metrics=("f1", "accuracy"),
    ),
    "qqp": GlueTask(
        name="qqp",
        text_columns=("question1", "question2"),
        template="Do these two questions ask the same thing? Answer yes or no.\n"
        "Question 1: {question1}\nQuestion 2: {question2}",
        label_words=("no", "yes"),
        label_names=("not_duplicate", "duplicate"),
        glue_metrics=("f1", "accuracy"),
    ),
    "rte": GlueTask(
        name="rte",
        text_columns=("sentence1", "sentence2"),
        template="Does the premise entail the hypothesis? Answer yes or no.\n"
        "Premise: {sentence1}\nHypothesis: {sentence2}",
        label_words=("yes", "no"),  # GLUE: 0 = entailment, 1 = not_entailment
        label_names=("entailment", "not_entailment"),
        glue_metrics=("accuracy",),
    ),
    "qnli": GlueTask(
        name="qnli",
        text_columns=("question", "sentence"),
        template="Does the sentence answer the question? Answer yes or no.\n"
        "Question: {question}\nSentence: {sentence}",
        label_words=("yes", "no"),  # GLUE: 0 = entailment, 1 = not_entailment
        label_names=("entailment", "not_entailment"),
        glue_metrics=("accuracy",),
    ),
    "mnli": GlueTask(
        name="mnli",
        text_columns=("premise", "hypothesis"),
        template="Does the premise entail the hypothesis? Answer yes, maybe or no.\n"
        "Premise: {premise}\nHypothesis: {hypothesis}",
        label_words=("yes", "maybe", "no"),  # GLUE: entailment, neutral, contradiction
        label_names=("entailment", "neutral", "contradiction"),
        glue_metrics=("accuracy",),
        validation_split="validation_matched",
    ),
    "stsb": GlueTask(
        name="stsb",
        text_columns=("sentence1", "sentence2"),
        template="How similar are these two sentences, from 0.0 to 5.0?\nSentence 1: {sentence1}\nSentence 2: {sentence2}",
        label_words=None,
        glue_metrics=("spearman", "pearson"),
        is_regression=True,
        default_score="spearman",
    ),
}

PAPER_TASKS = ("cola", "mrpc", "rte", "sst2")  # SAFT paper, appendix C.8
GLUE8_TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")  # the common merging benchmark
SCORE_KINDS = ("default", "glue")


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise KeyError(f"unknown GLUE task {name!r}; known tasks: {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def score_metric(task: GlueTask, kind: str = "default") -> str:
    """The metric whose value is a task's single score (averaged over tasks and normalized).

    'default': exact-match accuracy of the generated label word (Spearman for STS-B), the usual
    convention for text-to-text merging benchmarks; 'glue': the task's first official GLUE metric
    (CoLA Matthews correlation, MRPC/QQP F1, STS-B Spearman, accuracy elsewhere).
    """
    if kind == "default":
        return task.default_score
    if kind == "glue":
        return task.glue_metrics[0]
    raise ValueError(f"score kind must be one of {SCORE_KINDS}, got {kind!r}")


def format_input(task: GlueTask, row: dict) -> str:
    return task.template.format(**{col: row[col] for col in task.text_columns})


def stsb_to_text(score: float) -> str:
    """An STS-B score as T5's target string: nearest multiple of 0.2 in [0, 5] (halves round up), one decimal."""
    clipped = min(max(float(score), STSB_MIN), STSB_MAX)
    steps = math.floor(clipped * 5 + 0.5)  # x / 0.2 == x * 5, and x * 5 is exact for one-decimal inputs
    return f"{steps / 5:.1f}"


def format_target(task: GlueTask, label) -> str:
    if task.is_regression:
        return stsb_to_text(label)
    return task.label_words[int(label)]


def _normalize(text: str) -> str:
    # Tokenizers differ in how they detokenize ("0. 2" vs "0.2", "Yes" vs "yes"): compare without them.
    return "".join(str(text).split()).lower()


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d*)?|[-+]?\.\d+")


def parse_prediction(task: GlueTask, generated: str) -> tuple[float | int, bool]:
    """Map generated text to (prediction, parsed_ok).

    Classification: the label index whose word equals the normalized text, else UNPARSEABLE (-1),
    which never equals a reference (so it counts as wrong in accuracy, F1 and MCC).
    STS-B: the first number in the text clipped to [0, 5], else STSB_UNPARSEABLE_VALUE.
    """
    text = _normalize(generated)
    if task.is_regression:
        match = _NUMBER.search(text)
        if match is None:
            return STSB_UNPARSEABLE_VALUE, False
        value = float(match.group())
        if not math.isfinite(value):
            return STSB_UNPARSEABLE_VALUE, False
        return min(max(value, STSB_MIN), STSB_MAX), True
    for index, word in enumerate(task.label_words):
        if text == _normalize(word):
            return index, True
    return UNPARSEABLE, False
