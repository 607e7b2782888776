"""Generation-based GLUE evaluation: generate a few tokens, map them to labels, score per task.

`make_glue_evaluator` builds the callable the merging coefficient search needs: it loads the
model and tokenizes every task's evaluation split once; each call loads a candidate state dict
into the same model in place and returns {task: score}.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from saft_hf.glue.data import load_glue_split, tokenize_split
from saft_hf.metrics import compute_metrics
from saft_hf.tasks.glue import GLUE_HUB_DATASET, GlueTask, get_task, parse_prediction, score_metric


def load_seq2seq_model(name_or_path: str | os.PathLike, torch_dtype=None):
    """A seq2seq LM from a Hub name or model dir; a PEFT adapter dir is loaded on its base and merged in."""
    from transformers import AutoModelForSeq2SeqLM

    from saft_hf.model_paths import hub_load_errors

    dtype = {} if torch_dtype is None else {"dtype": torch_dtype}
    path = Path(name_or_path)
    if (path / "adapter_config.json").exists():
        from peft import PeftConfig, PeftModel

        base_name = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
        with hub_load_errors(base_name, f"base model of adapter {path}"):
            base = AutoModelForSeq2SeqLM.from_pretrained(base_name, **dtype)
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    from transformers import AutoConfig

    with hub_load_errors(name_or_path, "model"):
        config = AutoConfig.from_pretrained(str(name_or_path))
        if not getattr(config, "is_encoder_decoder", False):  # else a page-long "Unrecognized configuration"
            raise ValueError(f"model {name_or_path} is a {config.model_type!r} checkpoint; GLUE evaluation needs a "
                             "seq2seq model (T5 / Flan-T5, as the GLUE recipe fine-tunes) or a PEFT adapter of one")
        return AutoModelForSeq2SeqLM.from_pretrained(str(name_or_path), **dtype)


def tied_parameter_groups(model: torch.nn.Module) -> list[list[str]]:
    """Names of state-dict entries that share storage (T5: shared / embed_tokens / tied lm_head)."""
    by_pointer: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_pointer.setdefault(tensor.data_ptr(), []).append(name)
    return [names for names in by_pointer.values() if len(names) > 1]


def load_state_dict_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy `state_dict` into `model` in place, strictly, understanding tied weights.

    A tied tensor may appear under any one of its names (merged once) or under several names,
    which must then hold the same values (a merge that untied them is an error, not a silent pick).
    """
    own = model.state_dict()
    unexpected = sorted(set(state_dict) - set(own))
    if unexpected:
        raise KeyError(f"state dict has {len(unexpected)} key(s) the model does not: {unexpected[:5]}")
    covered = set(state_dict)
    for group in tied_parameter_groups(model):
        present = [k for k in group if k in state_dict]
        if present:
            covered.update(group)
            first = state_dict[present[0]]
            for other in present[1:]:
                if not torch.equal(first, state_dict[other]):
                    raise ValueError(
                        f"tied tensors {present[0]!r} and {other!r} differ in the state dict; the model ties them, "
                        "so they must be merged once (or identically)"
                    )
    missing = sorted(set(own) - covered)
    # Integer buffers (e.g. position ids) are not merged; keep the model's own.
    missing = [k for k in missing if own[k].is_floating_point()]
    if missing:
        raise KeyError(f"state dict lacks {len(missing)} model tensor(s): {missing[:5]}")
    with torch.no_grad():
        for name, value in state_dict.items():
            own[name].copy_(value.to(dtype=own[name].dtype, device=own[name].device))


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    encoded,
    batch_size: int = 32,
    max_new_tokens: int = 5,
    desc: str | None = None,
) -> list[str]:
    """Greedy generations for a tokenized split (`input_ids`, `attention_mask`), in the split's order.

    Inputs are batched longest-first to keep padding small; outputs are put back in order.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    input_ids = encoded["input_ids"]
    order = sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i]))
    texts: list[str] = [""] * len(order)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc or "generating", disable=len(starts) < 2, leave=False):
        index = order[start : start + batch_size]
        batch = tokenizer.pad(
            {"input_ids": [input_ids[i] for i in index], "attention_mask": [encoded["attention_mask"][i] for i in index]},
            return_tensors="pt",
        )
        out = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
        )
        for i, text in zip(index, tokenizer.batch_decode(out, skip_special_tokens=True)):
            texts[i] = text
    model.train(was_training)
    return texts


def score_generations(task: GlueTask, generations: Sequence[str], references: Sequence) -> dict[str, float]:
    """Exact-match accuracy / STS-B correlations plus the task's GLUE metrics and the unparseable rate."""
    parsed = [parse_prediction(task, text) for text in generations]
    predictions = [p for p, _ in parsed]
    names = list(dict.fromkeys(([] if task.is_regression else ["accuracy"]) + list(task.glue_metrics)))
    metrics = compute_metrics(names, predictions, list(references))
    metrics["unparseable_rate"] = sum(not ok for _, ok in parsed) / len(parsed)
    metrics["num_examples"] = len(parsed)
    return metrics


class GlueEvaluator:
    """Scores one model on several GLUE tasks; data is loaded and tokenized once, at construction."""

    def __init__(
        self,
        tasks: Sequence[str | GlueTask],
        model,
        tokenizer,
        split: str = "validation",
        max_samples: int | None = None,
        data_paths: Mapping[str, str | os.PathLike] | None = None,
        dataset_name: str = GLUE_HUB_DATASET,
        batch_size: int = 32,
        max_new_tokens: int = 5,
        max_source_length: int = 256,
        score: str = "default",
        seed: int = 0,
    ):
        self.tasks = [t if isinstance(t, GlueTask) else get_task(t) for t in tasks]
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.score_metrics = {t.name: score_metric(t, score) for t in self.tasks}
        data_paths = dict(data_paths or {})
        self.encoded = {}
        for task in self.tasks:
            raw = load_glue_split(task, split, data_paths.get(task.name), dataset_name, max_samples, seed)
            self.encoded[task.name] = tokenize_split(
                task, raw, tokenizer, max_source_length=max_source_length, with_targets=False
            )

    def evaluate(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
        """All metrics per task; with `state_dict`, first load it into the model (in place)."""
        return self.evaluate_per_example(state_dict)[0]

    def evaluate_per_example(self, state_dict: Mapping[str, torch.Tensor] | None = None
                             ) -> tuple[dict[str, dict[str, float]], dict[str, list[bool]]]:
        """(`evaluate`'s metrics, {task: exact-match correctness per example}) from one generation
        pass. Regression tasks (STS-B) have no per-example correctness and are left out of the second."""
        if state_dict is not None:
            load_state_dict_into(self.model, state_dict)
        results, correct = {}, {}
        for task in self.tasks:
            encoded = self.encoded[task.name]
            texts = generate_texts(
                self.model, self.tokenizer, encoded, self.batch_size, self.max_new_tokens, desc=f"eval {task.name}"
            )
            metrics = score_generations(task, texts, encoded["reference"])
            metrics["score"] = metrics[self.score_metrics[task.name]]
            metrics["score_metric"] = self.score_metrics[task.name]
            results[task.name] = metrics
            if not task.is_regression:
                correct[task.name] = [parse_prediction(task, t)[0] == r for t, r in zip(texts, encoded["reference"])]
        return results, correct

    def __call__(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
        return {task: m["score"] for task, m in self.evaluate(state_dict).items()}


def make_glue_evaluator(
    tasks: Sequence[str | GlueTask],
    model_dir_or_model,
    tokenizer=None,
    split: str = "validation",
    max_samples: int | None = None,
    **kwargs,
) -> Callable[[Mapping[str, torch.Tensor]], dict[str, float]]:
    """The coefficient search's evaluation callable: state_dict -> {task: score}.

    `model_dir_or_model` is a model (used and modified in place) or a Hub name / local dir; the
    tokenizer defaults to the one saved with the model dir. Extra keyword arguments go to
    `GlueEvaluator` (data_paths, dataset_name, batch_size, max_new_tokens, score, ...).
    """
    from saft_hf.model_paths import hub_load_errors

    if isinstance(model_dir_or_model, (str, os.PathLike)):
        if tokenizer is None:
            from transformers import AutoTokenizer

            with hub_load_errors(model_dir_or_model, "model"):
                tokenizer = AutoTokenizer.from_pretrained(str(model_dir_or_model))
        model = load_seq2seq_model(model_dir_or_model)
    else:
        model = model_dir_or_model
        if tokenizer is None:
            raise ValueError("pass the tokenizer when giving a model object to make_glue_evaluator")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        with hub_load_errors(tokenizer, "tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    return GlueEvaluator(tasks, model, tokenizer, split=split, max_samples=max_samples, **kwargs)
