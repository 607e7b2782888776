"""The Flan-T5 GLUE family's task pool and model pool (saft_hf.pools protocol), and its probe head.

Tasks are scored text-to-text: the model generates a few tokens, which are mapped to label words
(`saft_hf.glue.predict.GlueEvaluator`); the score is each task's `score_metric` (accuracy by default,
STS-B Spearman). Splits: "validation" is the task's validation split (MNLI: validation_matched);
"test" is `test_split` (GLUE's own test labels are hidden, so the family's merge study reports on
validation, as the paper does: `STUDY_TEST_SPLIT`).
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch

from saft_hf.pools import CheckpointModelPool, PerExampleScores, TaskInfo, TaskPool
from saft_hf.tasks.glue import GLUE_HUB_DATASET, get_task, score_metric

STUDY_TEST_SPLIT = "validation"


class GlueTaskPool(TaskPool):
    family = "glue"

    def __init__(self, tasks: Sequence[str], model, tokenizer=None, data_paths: Mapping[str, str] | None = None,
                 dataset_name: str = GLUE_HUB_DATASET, batch_size: int = 32, max_new_tokens: int = 5,
                 max_source_length: int = 256, score: str = "default", device: str | None = None,
                 test_split: str = "test"):
        """`model`: a seq2seq model, or a local dir / Hub name (loaded once; weights are then swapped in place)."""
        from saft_hf.glue.predict import load_seq2seq_model

        self._tasks = [get_task(t).name for t in tasks]
        if isinstance(model, (str, os.PathLike)):
            if tokenizer is None:
                tokenizer = str(model)
            model = load_seq2seq_model(model)
        if tokenizer is None:
            raise ValueError("GlueTaskPool: pass the tokenizer when giving a model object")
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            from saft_hf.model_paths import hub_load_errors

            with hub_load_errors(tokenizer, "tokenizer"):
                tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self.model, self.tokenizer, self.score = model, tokenizer, score
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.splits = {"validation": "validation", "test": test_split}
        self._kwargs = dict(data_paths=data_paths, dataset_name=dataset_name, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, max_source_length=max_source_length, score=score)
        self._evaluators: dict = {}

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def task_info(self, task: str) -> TaskInfo:
        self.check_tasks([task])
        spec = get_task(task)
        return TaskInfo(task, "text_to_text", score_metric(spec, self.score), spec.num_labels)

    def evaluator(self, split: str, tasks: Sequence[str], max_examples: int | None = None):
        """The `GlueEvaluator` of (split, tasks, subset size), built once; all share `self.model`."""
        from saft_hf.glue.predict import GlueEvaluator

        self.check_split(split)
        key = (split, tuple(tasks), max_examples)
        if key not in self._evaluators:
            self._evaluators[key] = GlueEvaluator(list(tasks), self.model, self.tokenizer, split=self.splits[split],
                                                  max_samples=max_examples, **self._kwargs)
        return self._evaluators[key]

    def evaluate(self, model, split="validation", tasks=None, max_examples=None):
        tasks = self.check_tasks(tasks)
        state = model.state_dict() if isinstance(model, torch.nn.Module) else model
        return self.evaluator(split, tasks, max_examples)(state)

    def evaluate_per_example(self, model, split="test", tasks=None, max_examples=None):
        """Scores as `evaluate` (each task's metric) and exact-match correctness per example for the
        classification tasks; its mean is the task's accuracy, which is what paired statistics
        compare (for CoLA / MRPC / QQP that is accuracy, not their MCC / F1 score). STS-B
        (regression, Spearman) has no per-example correctness and is listed in `excluded`."""
        import numpy as np

        tasks = self.check_tasks(tasks)
        state = model.state_dict() if isinstance(model, torch.nn.Module) else model
        metrics, correct = self.evaluator(split, tasks, max_examples).evaluate_per_example(state)
        excluded = {t: "regression task (Spearman correlation): no per-example correctness"
                    for t in tasks if t not in correct}
        return PerExampleScores({t: m["score"] for t, m in metrics.items()},
                                {t: np.asarray(c, dtype=bool) for t, c in correct.items()}, excluded)

    def unlabeled_inputs(self, task, split="validation", max_examples=None):
        yield from self._padded(self.evaluator(split, [task], max_examples).encoded[task])

    def _padded(self, encoded):
        pad = self.tokenizer.pad_token_id or 0
        size = self._kwargs["batch_size"]
        for start in range(0, len(encoded), size):
            rows = encoded[start:start + size]["input_ids"]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            yield {"input_ids": ids, "attention_mask": mask}

    def _merge_encoded(self, task: str, split: str, max_examples: int | None):
        from saft_hf.glue.predict import GlueEvaluator

        name = "train" if split == "train" else self.splits[split]
        key = ("merge_data", name, task, max_examples)
        if key not in self._evaluators:
            self._evaluators[key] = GlueEvaluator([task], self.model, self.tokenizer, split=name,
                                                  max_samples=max_examples, **self._kwargs)
        return name, self._evaluators[key].encoded[task]

    def merge_data(self, max_examples: int | None = None):
        """MergeData over the GLUE tasks: padded prompt batches of "train" / "validation" / "test"
        (this pool's test_split) and logits = the first decoded step's logits of each class's label
        word (`LabelWordHead` on `first_step_logits`). Regression tasks (STS-B) have no classes: refused."""
        from saft_hf.glue.predict import load_state_dict_into
        from saft_hf.merging.pooldata import PoolMergeData, tensor_digest

        heads = label_word_heads(self.tokenizer, self.tasks)
        device = next(self.model.parameters()).device

        def batches(task, split):
            for batch in self._padded(self._merge_encoded(task, split, max_examples)[1]):
                yield {k: v.to(device) for k, v in batch.items()}

        def load(state_dict):
            load_state_dict_into(self.model, state_dict)
            return self.model

        def logits(model, batch, task):
            return heads[task].to(device)(first_step_logits(model, batch))

        def describe(task, split):
            name, encoded = self._merge_encoded(task, split, max_examples)
            rows = encoded["input_ids"]
            tokens = torch.tensor([t for r in rows for t in r] + [len(r) for r in rows], dtype=torch.long)
            kw = self._kwargs
            return (f"glue|{kw['dataset_name']}|{(kw['data_paths'] or {}).get(task)}|{name}|n={len(rows)}|"
                    f"src={kw['max_source_length']}|batch={kw['batch_size']}|{tensor_digest([tokens, heads[task].token_ids])}")

        return PoolMergeData(self.tasks, batches, load, logits, describe, family="glue")


def _load_state(path: str) -> dict[str, torch.Tensor]:
    from saft_hf.glue.search import resolve_model_dir
    from saft_hf.merging import open_source

    src = open_source(resolve_model_dir(path))
    try:
        return {k: src.get(k) for k in src.keys()}
    finally:
        src.close()


def glue_model_pool(pretrained: str, checkpoints: Mapping[str, str]) -> CheckpointModelPool:
    """Full fine-tuned runs ({task: run dir}, weights as stored) and their `glue_scores.json`.
    (LoRA adapter runs merge through `saft_hf.glue.search.search_glue_merge`, which streams them.)"""
    return CheckpointModelPool(pretrained, checkpoints, _load_state)


class LabelWordHead(torch.nn.Module):
    """Class logits = the decoder's first-step logits of each class's label word (its first token):
    cross-entropy over them is the seq2seq loss of the label words restricted to the task's classes."""

    def __init__(self, token_ids: Sequence[int]):
        super().__init__()
        if len(set(token_ids)) != len(token_ids):
            raise ValueError(f"label words share a first token ({list(token_ids)}); the probe needs distinct ones")
        self.register_buffer("token_ids", torch.tensor(list(token_ids), dtype=torch.long))

    def forward(self, vocab_logits: torch.Tensor) -> torch.Tensor:
        return vocab_logits.index_select(-1, self.token_ids)


def first_step_logits(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Vocabulary logits `[batch, vocab]` of the first decoded token (a `TaskProbe` feature function)."""
    start = model.config.decoder_start_token_id
    decoder_input_ids = torch.full((inputs["input_ids"].shape[0], 1), int(start), dtype=torch.long,
                                   device=inputs["input_ids"].device)
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                 decoder_input_ids=decoder_input_ids).logits[:, 0, :]


def label_word_heads(tokenizer, tasks: Sequence[str]) -> dict[str, LabelWordHead]:
    heads = {}
    for name in tasks:
        task = get_task(name)
        if task.is_regression:
            raise ValueError(f"GLUE task {name!r} is a regression task; the label-word probe needs classes")
        ids = [tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in task.label_words]
        heads[name] = LabelWordHead(ids)
    return heads


def merge_data(model: str, tasks: Sequence[str], data_paths: Mapping[str, str] | None = None,
               max_examples: int | None = None, **pool_args):
    """The GLUE tasks' MergeData for a merge config: `data: {callable: saft_hf.glue.pools:merge_data,
    args: {model: PRETRAINED_DIR, tasks: [sst2, rte], max_examples: 256}}` (other args: GlueTaskPool's)."""
    return GlueTaskPool(tasks, model, data_paths=data_paths, **pool_args).merge_data(max_examples)
