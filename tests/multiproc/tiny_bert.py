"""Tiny BERT classifier, token datasets and a real merged-model evaluator, shared by
tests/test_callbacks.py and the torchrun worker tests/multiproc/merge_monitor_worker.py."""

import copy

import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

CONFIG = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**CONFIG))


class TokenDataset(torch.utils.data.Dataset):
    """Random token ids; the label is a fixed rule of the tokens (different per `rule`)."""

    def __init__(self, n=32, length=8, vocab=50, seed=0, rule=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        key = self.ids[:, rule % length]
        self.labels = (key > vocab // 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def encoder_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.bert.state_dict().items()}


def perturbed_encoder(theta0: dict, seed: int, scale: float = 0.05) -> BertModel:
    """An 'other task' fine-tuned encoder: pretrained + a random delta."""
    g = torch.Generator().manual_seed(seed)
    enc = BertModel(BertConfig(**CONFIG), add_pooling_layer=True)
    enc.load_state_dict({k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                         for k, v in theta0.items()})
    return enc


class MergedEvaluator:
    """Accuracy of merged encoder weights on two tasks, with its own model copy (encoder + the
    initial classifier head, frozen): the live training model is never used."""

    def __init__(self, model: BertForSequenceClassification, tasks: dict):
        self.model = copy.deepcopy(model).eval()
        self.tasks = tasks
        self.calls = 0

    @torch.no_grad()
    def evaluate(self, state_dict, max_examples=None):
        self.calls += 1
        self.model.bert.load_state_dict(state_dict, strict=True)
        out = {}
        for name, ds in self.tasks.items():
            n = len(ds) if max_examples is None else min(max_examples, len(ds))
            logits = self.model(input_ids=ds.ids[:n], attention_mask=torch.ones_like(ds.ids[:n])).logits
            out[name] = float((logits.argmax(-1) == ds.labels[:n]).float().mean())
        return out


def eval_tasks() -> dict:
    return {"task_a": TokenDataset(n=24, seed=11, rule=0), "task_b": TokenDataset(n=24, seed=12, rule=3)}
