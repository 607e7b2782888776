"""MergeMonitorCallback with a real Trainer on a tiny BERT: logged values against a manual
merge + evaluation of the checkpoints saved at the same steps, plain Trainer and SAFTTrainer
(sharpness), LoRA, best-checkpoint selection, cost reporting, errors."""

import json

import pytest
import torch
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

from multiproc.tiny_bert import MergedEvaluator, TokenDataset, encoder_state, eval_tasks, perturbed_encoder, tiny_bert
from saft_hf import MergeMonitorCallback, SAFTTrainer, SAFTTrainingArguments
from saft_hf.live_taskvector import live_task_vector
from saft_hf.merging import task_arithmetic, task_vector, ties_merging
from saft_hf.merging.io import open_source
from saft_hf.merging.taskvectors import CheckpointTaskVector, DictTaskVector, LoraTaskVector

pytestmark = pytest.mark.usefixtures("single_thread_torch")

FT_ACC = {"task_a": 0.75, "task_b": 0.6}


def _args(cls, tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2,
                  lr_scheduler_type="constant", weight_decay=0.0, use_cpu=True, report_to="none",
                  save_strategy="steps", save_steps=2, logging_steps=3, seed=3, disable_tqdm=True)
    kwargs.update(overrides)
    return cls(**kwargs)


@pytest.fixture(scope="module")
def others(tmp_path_factory):
    """Two other tasks: a fine-tuned encoder on disk (read lazily) and an in-memory task vector."""
    theta0 = encoder_state(tiny_bert())
    path = tmp_path_factory.mktemp("other") / "task_c"
    perturbed_encoder(theta0, seed=1).save_pretrained(path)
    g = torch.Generator().manual_seed(2)
    tv = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in theta0.items() if v.is_floating_point()}
    return {"task_c": str(path), "task_d": tv}


def _manual(theta0, finetuned_encoder, others, evaluator, method="task_arithmetic", **params):
    taus = [task_vector(theta0, finetuned_encoder), CheckpointTaskVector(open_source(others["task_c"]), "c"),
            DictTaskVector(others["task_d"], "d")]
    merged = task_arithmetic(theta0, taus, **params) if method == "task_arithmetic" else ties_merging(theta0, taus, **params)
    return evaluator.evaluate(merged)


def _entries(trainer, key="merged_mean_accuracy"):
    return [e for e in trainer.state.log_history if key in e and "eval_loss" not in e]


def test_plain_trainer_logs_match_manual_merge_of_saved_checkpoints(tmp_path, others):
    model = tiny_bert()
    theta0 = encoder_state(model)
    evaluator = MergedEvaluator(model, eval_tasks())
    cb = MergeMonitorCallback(others, evaluator, every_n_steps=2, methods=("task_arithmetic", "ties"),
                              pretrained=theta0, finetuned_accuracy=FT_ACC,
                              method_params={"task_arithmetic": {"scaling": 0.3}})
    trainer = Trainer(model=model, args=_args(TrainingArguments, tmp_path), train_dataset=TokenDataset(seed=1),
                      callbacks=[cb])
    trainer.train()

    entries = _entries(trainer)
    assert [e["step"] for e in entries] == [2, 4, 6] == [r["step"] for r in cb.records]
    # step 6 is also a logging step: the monitor entry comes right after that step's loss entry
    hist = trainer.state.log_history
    i6 = hist.index(entries[-1])
    assert "loss" in hist[i6 - 1] and hist[i6 - 1]["step"] == 6
    assert "merge_monitor_sharpness" not in entries[0]  # plain Trainer: no SAM, no sharpness

    check = MergedEvaluator(tiny_bert(), eval_tasks())
    seen = set()
    for e in entries:
        ft = BertForSequenceClassification.from_pretrained(tmp_path / "out" / f"checkpoint-{e['step']}")
        ta = _manual(theta0, encoder_state(ft), others, check, scaling=0.3)
        ties = _manual(theta0, encoder_state(ft), others, check, method="ties", scaling=1.0, density=0.2)
        for t in ("task_a", "task_b"):
            assert e[f"merged_task_arithmetic_{t}_accuracy"] == ta[t]
            assert e[f"merged_ties_{t}_accuracy"] == ties[t]
            assert e[f"merged_task_arithmetic_{t}_normalized"] == pytest.approx(ta[t] / FT_ACC[t])
        assert e["merged_mean_accuracy"] == pytest.approx((ta["task_a"] + ta["task_b"]) / 2)
        assert e["merged_ties_mean_normalized"] == pytest.approx((ties["task_a"] / 0.75 + ties["task_b"] / 0.6) / 2)
        seen.add((ta["task_a"], ta["task_b"], ties["task_a"], ties["task_b"]))
        assert e["merge_monitor_seconds"] > 0 and 0 < e["merge_monitor_share"] < 1
    assert len(seen) > 1, "the merged accuracy never changed: the test cannot tell steps apart"
    assert evaluator.calls == 6  # 3 steps x 2 methods
    assert cb.seconds_per_call > 0 and 0 < cb.share < 1 and cb.train_seconds > cb.total_seconds
    # the written trainer state (TensorBoard/W&B read the same log calls) holds the entries too
    state = json.loads((tmp_path / "out" / "checkpoint-6" / "trainer_state.json").read_text())
    assert any("merged_ties_mean_accuracy" in e for e in state["log_history"])


def test_monitor_does_not_change_training(tmp_path, others):
    def run(with_cb):
        model = tiny_bert()
        cbs = [MergeMonitorCallback(others, MergedEvaluator(model, eval_tasks()), 1, pretrained=encoder_state(model))] if with_cb else []
        Trainer(model=model, args=_args(TrainingArguments, tmp_path / str(with_cb), max_steps=4, save_strategy="no"),
                train_dataset=TokenDataset(seed=1), callbacks=cbs).train()
        return model.state_dict()

    plain, monitored = run(False), run(True)
    assert all(torch.equal(plain[k], monitored[k]) for k in plain)
    assert not torch.equal(plain["bert.encoder.layer.0.attention.self.query.weight"],
                           tiny_bert().state_dict()["bert.encoder.layer.0.attention.self.query.weight"])


def test_saft_trainer_logs_sharpness_of_the_same_step(tmp_path, others):
    model = tiny_bert()
    cb = MergeMonitorCallback(others, MergedEvaluator(model, eval_tasks()), every_n_steps=2,
                              pretrained=encoder_state(model), max_examples=8)
    args = _args(SAFTTrainingArguments, tmp_path, max_steps=4, logging_steps=2, save_strategy="no", sam_rho=0.05)
    trainer = SAFTTrainer(model=model, args=args, train_dataset=TokenDataset(seed=1), callbacks=[cb])
    trainer.train()
    entries = _entries(trainer)
    assert [e["step"] for e in entries] == [2, 4]
    for e in entries:
        loss = next(x for x in trainer.state.log_history if "loss" in x and x["step"] == e["step"])
        assert e["merge_monitor_sharpness"] == pytest.approx(loss["sam_perturbed_loss"] - loss["loss"])
        assert e["merge_monitor_sharpness_step"] == e["step"]
        assert "merged_mean_normalized" not in e  # no fine-tuned accuracies given
        # max_examples reached the evaluator: accuracies are multiples of 1/8
        assert (e["merged_task_arithmetic_task_a_accuracy"] * 8) % 1 == 0


def _lora(model, seed=None):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                  task_type="SEQ_CLS", lora_dropout=0.0))
    if seed is not None:  # an 'other task' adapter with a non-zero B
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return peft_model


def test_lora_live_task_vector_and_logged_merge(tmp_path):
    base = tiny_bert()
    theta0 = {k: v.detach().clone() for k, v in base.state_dict().items()}  # full model keys, head included
    other_dir = tmp_path / "other_adapter"
    _lora(tiny_bert(), seed=5).save_pretrained(other_dir)
    model = _lora(base)

    class FullEvaluator:  # scores the whole merged classifier (encoder + merged head)
        def __init__(self):
            self.model = tiny_bert().eval()
            self.tasks = eval_tasks()

        @torch.no_grad()
        def evaluate(self, sd):
            self.model.load_state_dict(sd)
            return {n: float((self.model(input_ids=d.ids).logits.argmax(-1) == d.labels).float().mean())
                    for n, d in self.tasks.items()}

    cb = MergeMonitorCallback([str(other_dir)], FullEvaluator(), every_n_steps=2, pretrained=theta0)
    trainer = Trainer(model=model, args=_args(TrainingArguments, tmp_path, max_steps=4, learning_rate=5e-2),
                      train_dataset=TokenDataset(seed=1), callbacks=[cb])
    trainer.train()
    frozen = {k: p for k, p in model.state_dict().items() if ".base_layer." in k}
    assert frozen and all(torch.equal(p, theta0[k.replace("base_model.model.", "").replace(".base_layer", "")])
                          for k, p in frozen.items())  # LoRA trains only the adapters (and the head)

    # the live delta equals the one saft_hf.merging forms from the saved adapter
    model.save_pretrained(tmp_path / "final_adapter")
    live = live_task_vector(model, theta0)
    saved = LoraTaskVector(tmp_path / "final_adapter")
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert live[q].abs().max() > 0 and live["bert.encoder.layer.0.attention.self.key.weight"].abs().max() == 0
    for k, v in live.items():
        torch.testing.assert_close(v, saved.get(k, theta0[k]), rtol=0, atol=1e-7)

    check = FullEvaluator()
    entries = _entries(trainer)
    assert [e["step"] for e in entries] == [2, 4]
    for e in entries:
        current = LoraTaskVector(tmp_path / "out" / f"checkpoint-{e['step']}")
        merged = task_arithmetic(theta0, [current, LoraTaskVector(other_dir)], 0.4)
        acc = check.evaluate(merged)
        assert e["merged_task_arithmetic_task_a_accuracy"] == acc["task_a"]
        assert e["merged_task_arithmetic_task_b_accuracy"] == acc["task_b"]


def _best_model_args(tmp_path, cls=TrainingArguments, **kw):
    return _args(cls, tmp_path, **{**dict(max_steps=8, logging_steps=2, eval_strategy="steps", eval_steps=2, save_steps=2), **kw})


def test_metric_for_best_model_keeps_the_checkpoint_that_merges_best(tmp_path, others):
    """A run without the monitor gives the merged weights at step 4; the evaluator's score peaks
    there (1 / (1 + distance)), so the best checkpoint is step 4, not the last one (8)."""
    theta0 = encoder_state(tiny_bert())
    ref = Trainer(model=tiny_bert(), args=_best_model_args(tmp_path / "ref", eval_strategy="no"),
                  train_dataset=TokenDataset(seed=1))
    ref.train()
    ckpt = lambda root, s: BertForSequenceClassification.from_pretrained(root / "out" / f"checkpoint-{s}")  # noqa: E731
    taus_other = [CheckpointTaskVector(open_source(others["task_c"]), "c"), DictTaskVector(others["task_d"], "d")]
    target = task_arithmetic(theta0, [task_vector(theta0, encoder_state(ckpt(tmp_path / "ref", 4)))] + taus_other, 0.4)

    def peaked(sd):
        dist = sum(float((sd[k].float() - target[k].float()).pow(2).sum()) for k in target if target[k].is_floating_point()) ** 0.5
        return {"task_a": 1.0 / (1.0 + 100 * dist), "task_b": 1.0 / (1.0 + 100 * dist)}

    model = tiny_bert()
    cb = MergeMonitorCallback(others, peaked, every_n_steps=0, pretrained=theta0, finetuned_accuracy=FT_ACC)
    args = _best_model_args(tmp_path / "run", load_best_model_at_end=True, metric_for_best_model="merged_mean_normalized")
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(seed=1), eval_dataset=TokenDataset(n=8, seed=9),
                      callbacks=[cb])
    trainer.train()
    assert [r["step"] for r in cb.records] == [2, 4, 6, 8]  # once per evaluation (every_n_steps=0)
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    assert trainer.state.best_metric == pytest.approx((1 / 0.75 + 1 / 0.6) / 2)
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4, 6, 8] and all("eval_merged_mean_normalized" in e for e in evals)
    # the model now holds the step-4 weights, which differ from the last step's
    best, last = ckpt(tmp_path / "ref", 4).state_dict(), ckpt(tmp_path / "ref", 8).state_dict()
    final = model.state_dict()
    assert all(torch.equal(final[k], best[k]) for k in best)
    assert not all(torch.equal(best[k], last[k]) for k in best)


def test_attach_and_errors(tmp_path, others):
    model = tiny_bert()
    theta0 = encoder_state(model)
    ev = MergedEvaluator(model, eval_tasks())
    with pytest.raises(ValueError, match="every_n_steps"):
        MergeMonitorCallback(others, ev, -1, pretrained=theta0)
    with pytest.raises(ValueError, match="unknown merge method"):
        MergeMonitorCallback(others, ev, 1, methods=("dare",), pretrained=theta0)
    with pytest.raises(ValueError, match="read task data"):
        MergeMonitorCallback(others, ev, 1, methods=("regmean",), pretrained=theta0)
    with pytest.raises(ValueError, match="method_params given for"):
        MergeMonitorCallback(others, ev, 1, pretrained=theta0, method_params={"ties": {}})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MergeMonitorCallback([str(tmp_path / "nope")], ev, 1, pretrained=theta0)
    with pytest.raises(TypeError, match="one task vector"):
        MergeMonitorCallback(others["task_d"], ev, 1, pretrained=theta0)
    with pytest.raises(ValueError, match="empty"):
        MergeMonitorCallback([], ev, 1, pretrained=theta0)
    with pytest.raises(TypeError, match="evaluator"):
        MergeMonitorCallback(others, 3, 1, pretrained=theta0)

    # a task without a fine-tuned accuracy is named at the first call; attach() registers it
    cb = MergeMonitorCallback(others, ev, 1, pretrained=theta0, finetuned_accuracy={"task_a": 0.7})
    trainer = Trainer(model=model, args=_args(TrainingArguments, tmp_path, max_steps=1, save_strategy="no"),
                      train_dataset=TokenDataset(seed=1))
    assert cb.attach(trainer) is trainer and cb in trainer.callback_handler.callbacks
    with pytest.raises(KeyError, match="task_b"):
        trainer.train()

    # pretrained weights that are not part of the model are refused with a hint
    wrong = {"something.else.weight": torch.zeros(2)}
    cb = MergeMonitorCallback([{"something.else.weight": torch.zeros(2)}], ev, 1, pretrained=wrong)
    trainer = Trainer(model=tiny_bert(), args=_args(TrainingArguments, tmp_path / "b", max_steps=1, save_strategy="no"),
                      train_dataset=TokenDataset(seed=1), callbacks=[cb])
    with pytest.raises(KeyError, match="model_prefix"):
        trainer.train()


def test_pretrained_from_a_checkpoint_path(tmp_path, others):
    model = tiny_bert()
    model.bert.save_pretrained(tmp_path / "pretrained")
    cb = MergeMonitorCallback(others, MergedEvaluator(model, eval_tasks()), 2, pretrained=str(tmp_path / "pretrained"),
                              methods="weighted_average")
    trainer = Trainer(model=model, args=_args(TrainingArguments, tmp_path, max_steps=2, save_strategy="no"),
                      train_dataset=TokenDataset(seed=1), callbacks=[cb])
    trainer.train()
    (entry,) = _entries(trainer)
    expected = _manual(encoder_state(tiny_bert()), encoder_state(model), others, MergedEvaluator(tiny_bert(), eval_tasks()),
                       scaling=1 / 3)
    assert entry["merged_weighted_average_task_a_accuracy"] == expected["task_a"]


def test_pretrained_given_as_live_views_is_copied(tmp_path, others):
    model = tiny_bert()
    theta0 = encoder_state(model)
    cb = MergeMonitorCallback(others, MergedEvaluator(model, eval_tasks()), 3, pretrained=model.bert.state_dict(),
                              methods="ties")
    trainer = Trainer(model=model, args=_args(TrainingArguments, tmp_path, max_steps=3, save_strategy="no"),
                      train_dataset=TokenDataset(seed=1), callbacks=[cb])
    trainer.train()
    (entry,) = _entries(trainer)
    q = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(cb._pretrained[q], theta0[q]) and not torch.equal(theta0[q], model.bert.state_dict()[q])
    expected = _manual(theta0, encoder_state(model), others, MergedEvaluator(tiny_bert(), eval_tasks()), method="ties",
                       scaling=1.0, density=0.2)
    assert entry["merged_ties_task_a_accuracy"] == expected["task_a"]
    assert entry["merged_ties_task_b_accuracy"] == expected["task_b"]
    with pytest.raises(TypeError, match="pretrained must be"):
        MergeMonitorCallback(others, cb._evaluate, 1, pretrained=3)
