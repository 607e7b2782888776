"""SAFTTrainer, single process: exact agreement with a hand-written SAM/ASAM replay and Trainer parity."""

import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments

from multiproc.sam_reference import TinyClassifier, TinyDataset, max_difference, replay_sam
from saft_hf import SAFTTrainer, SAFTTrainingArguments

pytestmark = pytest.mark.usefixtures("single_thread_torch")

LR = 0.1


class RecordingTrainer(SAFTTrainer):
    """Keeps a copy of every micro-batch, in order, for the replay."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.recorded.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def make_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=2,
        seed=3,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return SAFTTrainingArguments(**kwargs)


def train_recording(tmp_path, model_kwargs=None, **arg_overrides):
    torch.manual_seed(0)
    model = TinyClassifier(**(model_kwargs or {}))
    init = copy.deepcopy(model.state_dict())
    trainer = RecordingTrainer(model=model, args=make_args(tmp_path, **arg_overrides), train_dataset=TinyDataset())
    trainer.recorded = []
    trainer.train()
    return trainer, init


@pytest.mark.parametrize(
    "adaptive,scope,eta",
    [(True, "all", 0.0), (True, "weights", 0.01), (False, "all", 0.0)],
)
def test_matches_hand_written_replay_with_grad_accumulation(tmp_path, adaptive, scope, eta):
    rho = 0.5 if adaptive else 0.05
    trainer, init = train_recording(
        tmp_path,
        model_kwargs={"unused_parameter": True, "frozen_first": True},
        sam_rho=rho,
        sam_adaptive=adaptive,
        sam_scope=scope,
        sam_eta=eta,
    )
    assert len(trainer.recorded) == 8  # 4 optimizer steps x 2 micro-batches
    reference = replay_sam(
        TinyClassifier(unused_parameter=True, frozen_first=True),
        init,
        [trainer.recorded],
        grad_accum=2,
        lr=LR,
        rho=rho,
        adaptive=adaptive,
        eta=eta,
        scope=scope,
    )
    trained = {k: v for k, v in trainer.model.state_dict().items() if k in reference}
    assert max_difference(trained, reference) < 1e-6
    # the test can fail: plain SGD (rho=0 replay) and the other scope are far away
    plain = replay_sam(
        TinyClassifier(unused_parameter=True, frozen_first=True), init, [trainer.recorded],
        grad_accum=2, lr=LR, rho=0.0, adaptive=adaptive,
    )
    assert max_difference(trained, plain) > 1e-4
    if adaptive:
        other = replay_sam(
            TinyClassifier(unused_parameter=True, frozen_first=True), init, [trainer.recorded],
            grad_accum=2, lr=LR, rho=rho, adaptive=True, eta=eta,
            scope="weights" if scope == "all" else "all",
        )
        assert max_difference(trained, other) > 1e-5
    # frozen and unused parameters are untouched
    assert torch.equal(trainer.model.fc1.weight, init["fc1.weight"])
    assert torch.equal(trainer.model.unused, init["unused"])


def test_rho_zero_is_bit_identical_to_trainer(tmp_path):
    torch.manual_seed(0)
    model_a = TinyClassifier()
    model_b = copy.deepcopy(model_a)
    args = make_args(tmp_path, sam_rho=0.0, optim="adamw_torch", lr_scheduler_type="linear", max_grad_norm=1.0)
    SAFTTrainer(model=model_a, args=args, train_dataset=TinyDataset()).train()
    plain_args = TrainingArguments(**{k: v for k, v in args.to_dict().items() if not k.startswith("sam_")} | {})
    Trainer(model=model_b, args=plain_args, train_dataset=TinyDataset()).train()
    for (name, a), (_, b) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(a, b), name
