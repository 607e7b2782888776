"""The demo family's task pool and model pool (saft_hf.pools protocol).

Tasks are the demo's text classification tasks scored by a frozen zero-shot head on the mean-pooled
encoder output; models are encoder state dicts. Splits are tokenized once; `max_examples` takes the
first N examples of a split (the splits are shuffled once at preparation, with a fixed seed).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping, Sequence

import torch

from saft_hf.demo import model as demo_model
from saft_hf.pools import CheckpointModelPool, PerExampleScores, TaskInfo, TaskPool

SPLIT_NAMES = {"validation": "validation", "test": "test"}


class DemoTaskPool(TaskPool):
    """Accuracy of encoder weights on the demo's tasks, with one reusable encoder instance.

    `tokenized` maps task -> {"validation": TokenizedSplit, "test": TokenizedSplit, ...}."""

    family = "demo"

    def __init__(self, encoder: torch.nn.Module, heads: Mapping, tokenized: Mapping[str, Mapping], pad_id: int,
                 batch_size: int = 128, progress: bool = True):
        self.encoder = copy.deepcopy(encoder)
        self.heads, self.tokenized, self.pad_id, self.batch_size = dict(heads), dict(tokenized), pad_id, batch_size
        self.progress = progress

    @property
    def tasks(self) -> list[str]:
        return list(self.tokenized)

    def task_info(self, task: str) -> TaskInfo:
        self.check_tasks([task])
        return TaskInfo(task, "zero_shot_classifier", "accuracy", int(self.heads[task].weight.shape[0]))

    def load(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        missing, unexpected = self.encoder.load_state_dict(state_dict, strict=False)
        float_missing = [k for k in missing if self.encoder.state_dict()[k].is_floating_point()]
        if float_missing or unexpected:
            raise RuntimeError(f"merged weights do not fit the encoder: missing {float_missing[:5]}, "
                               f"unexpected {list(unexpected)[:5]}")

    def split(self, task: str, split: str, max_examples: int | None = None) -> demo_model.TokenizedSplit:
        self.check_split(split)
        data = self.tokenized[task][SPLIT_NAMES[split]]
        return data.subset(max_examples) if max_examples else data

    def evaluate(self, model, split="validation", tasks=None, max_examples=None, desc: str | None = None):
        return self.evaluate_per_example(model, split, tasks, max_examples, desc).scores

    def evaluate_per_example(self, model, split="test", tasks=None, max_examples=None,
                             desc: str | None = None) -> PerExampleScores:
        """Accuracy and per-example correctness (the split's stored order) of one pass."""
        tasks = self.check_tasks(tasks)
        encoder = model if isinstance(model, torch.nn.Module) else None
        if encoder is None:
            self.load(model)
            encoder = self.encoder
        scores, correct = {}, {}
        for name in tasks:
            data = self.split(name, split, max_examples)
            feats = demo_model.encode(encoder, data.input_ids, self.pad_id, self.batch_size,
                                      desc if self.progress else None)
            hits = demo_model.correct(self.heads[name], feats, data.labels)
            scores[name] = float(hits.float().mean())  # = demo_model.accuracy, bit for bit
            correct[name] = hits.numpy()
        return PerExampleScores(scores, correct)

    def unlabeled_inputs(self, task, split="validation", max_examples=None):
        data = self.split(task, split, max_examples)
        for start in range(0, len(data), self.batch_size):
            yield demo_model.pad_batch(data.input_ids[start:start + self.batch_size], self.pad_id)

    def merge_data(self, max_examples: int | None = None):
        """MergeData over the demo's tasks: padded token batches of "train" / "validation" /
        "test" (in split order, `batch_size` each) and logits = the task's frozen zero-shot head on
        the mean-pooled encoder output (what fine-tuning trained). The encoder instance is reused."""
        from saft_hf.heads import mean_pooled_text_features
        from saft_hf.merging.pooldata import PoolMergeData, tensor_digest

        def ids(task, split):
            data = self.tokenized[task][split]
            return data.input_ids[:max_examples] if max_examples else data.input_ids

        def batches(task, split):
            rows = ids(task, split)
            for start in range(0, len(rows), self.batch_size):
                yield demo_model.pad_batch(rows[start:start + self.batch_size], self.pad_id)

        def load(state_dict):
            self.load(state_dict)
            return self.encoder

        def logits(model, batch, task):
            return self.heads[task](mean_pooled_text_features(model, batch))

        def describe(task, split):
            rows = ids(task, split)
            tokens = torch.tensor([t for r in rows for t in r] + [len(r) for r in rows], dtype=torch.long)
            return (f"demo|n={len(rows)}|batch={self.batch_size}|pad={self.pad_id}|"
                    f"{tensor_digest([tokens, self.heads[task].weight])}")

        missing = [(t, s) for t in self.tasks for s in ("train", "validation", "test") if s not in self.tokenized[t]]
        if missing:
            raise ValueError(f"demo merge data: no tokenized split for {missing}; tokenize train, validation and test")
        return PoolMergeData(self.tasks, batches, load, logits, describe, family="demo")


def _load_encoder_state(path: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in demo_model.load_encoder(str(path)).state_dict().items()}


def demo_model_pool(pretrained: str | Path, checkpoints: Mapping[str, str | Path]) -> CheckpointModelPool:
    """The demo's fine-tuned encoders on disk (`saft-hf demo`'s cache layout, or any HF encoder dirs)."""
    return CheckpointModelPool(str(pretrained), {t: str(p) for t, p in checkpoints.items()}, _load_encoder_state)


def demo_task_pool(pretrained: str, tasks: Sequence[str], cache_dir: str | None = None,
                   logit_scale: float | None = None, max_length: int | None = None, test_fraction: float | None = None,
                   batch_size: int = 128) -> DemoTaskPool:
    """The demo's task pool built from its data cache, with heads as `saft-hf demo` builds them."""
    from saft_hf.demo.sources import default_cache_dir
    from saft_hf.demo.study import StudyConfig, build_heads, prepare_tasks, tokenize_tasks

    defaults = StudyConfig()
    cfg = StudyConfig(model=pretrained, tasks=tuple(tasks), logit_scale=logit_scale,
                      max_length=max_length or defaults.max_length,
                      test_fraction=defaults.test_fraction if test_fraction is None else test_fraction,
                      cache_dir=cache_dir, min_tasks=len(tasks))
    demo_model.check_text_encoder(pretrained)  # before any data work: a ViT / T5 fails here, named
    tokenizer = demo_model.load_tokenizer(pretrained)
    data, _ = prepare_tasks(cfg, Path(cache_dir) if cache_dir else default_cache_dir())
    encoder = demo_model.load_encoder(pretrained)
    tokenize_tasks(data, tokenizer, cfg)
    heads, _ = build_heads(encoder, tokenizer, data, cfg)
    return DemoTaskPool(encoder, heads, {n: td.tokenized for n, td in data.items()}, tokenizer.pad_token_id or 0,
                        batch_size)


def merge_data(pretrained: str, tasks: Sequence[str], cache_dir: str | None = None, logit_scale: float | None = None,
               max_length: int | None = None, test_fraction: float | None = None, batch_size: int = 128,
               max_examples: int | None = None):
    """The demo tasks' MergeData for a merge config: `data: {callable: saft_hf.demo.pools:merge_data,
    args: {pretrained: PATH, tasks: [sst2, ...], logit_scale: 50}}` (heads built as `saft-hf demo` builds them)."""
    pool = demo_task_pool(pretrained, tasks, cache_dir=cache_dir, logit_scale=logit_scale, max_length=max_length,
                          test_fraction=test_fraction, batch_size=batch_size)
    return pool.merge_data(max_examples)
