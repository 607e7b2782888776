"""SAFTTrainer features: BatchNorm, checkpointing, errors, model card, logs, non-finite gradients,
FLOPs, bf16, resume, Seq2Seq twin."""

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, T5Config, T5ForConditionalGeneration, TrainingArguments

from multiproc.sam_reference import TinyClassifier, TinyDataset, max_difference, replay_sam
from saft_hf import SAFTSeq2SeqTrainer, SAFTSeq2SeqTrainingArguments, SAFTTrainer, SAFTTrainingArguments
from saft_hf.trainer import SAFTTrainerMixin
from test_trainer import LR, RecordingTrainer, make_args

pytestmark = pytest.mark.usefixtures("single_thread_torch")


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=16, length=8, vocab=50, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        self.labels = (self.ids[:, 0] > vocab // 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
    )
    return BertForSequenceClassification(config)


# ---------------------------------------------------------------- BatchNorm
def test_batchnorm_running_stats_are_updated_once_per_micro_batch(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier(batchnorm=True)
    init = copy.deepcopy(model.state_dict())
    trainer = RecordingTrainer(model=model, args=make_args(tmp_path, gradient_accumulation_steps=1, max_steps=1),
                               train_dataset=TinyDataset())
    trainer.recorded = []
    trainer.train()
    (batch,) = trainer.recorded
    expected = TinyClassifier(batchnorm=True)
    expected.load_state_dict(init)
    expected.train()
    expected(batch["x"])  # one update at the unperturbed weights
    assert int(trainer.model.norm.num_batches_tracked) == 1
    torch.testing.assert_close(trainer.model.norm.running_mean, expected.norm.running_mean, rtol=0, atol=1e-7)
    torch.testing.assert_close(trainer.model.norm.running_var, expected.norm.running_var, rtol=0, atol=1e-7)
    # and the weights still follow the SAM replay (train-mode BN uses batch statistics)
    reference = replay_sam(TinyClassifier(batchnorm=True), init, [trainer.recorded], grad_accum=1, lr=LR,
                           rho=0.5, adaptive=True)
    assert max_difference({k: trainer.model.state_dict()[k] for k in reference}, reference) < 1e-6


# ---------------------------------------------------------------- gradient checkpointing
def _train_bert(tmp_path, name, **overrides):
    model = tiny_bert()
    args = make_args(tmp_path / name, per_device_train_batch_size=4, max_steps=2, **overrides)
    SAFTTrainer(model=model, args=args, train_dataset=TokenDataset()).train()
    return model


def test_non_reentrant_checkpointing_gives_the_same_weights(tmp_path):
    plain = _train_bert(tmp_path, "plain")
    checkpointed = _train_bert(tmp_path, "ckpt", activation_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    assert max_difference(plain.state_dict(), checkpointed.state_dict()) < 1e-6
    assert max_difference(plain.state_dict(), tiny_bert().state_dict()) > 1e-4


def test_reentrant_checkpointing_is_refused(tmp_path):
    args = make_args(tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant"):
        SAFTTrainer(model=tiny_bert(), args=args, train_dataset=TokenDataset())


# ---------------------------------------------------------------- argument and set-up errors
@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"sam_rho": -0.1}, "sam_rho"),
        ({"sam_scope": "biases"}, "sam_scope"),
        ({"sam_eta": -0.01}, "sam_eta"),
        ({"sam_adaptive": False, "sam_eta": 0.01}, "sam_eta"),
    ],
)
def test_bad_arguments_raise(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **overrides)


def test_plain_training_arguments_are_refused(tmp_path):
    with pytest.raises(TypeError, match="SAFTTrainingArguments"):
        SAFTTrainer(model=TinyClassifier(), args=TrainingArguments(output_dir=str(tmp_path)), train_dataset=TinyDataset())


def test_closure_sam_optimizer_and_lomo_are_refused(tmp_path):
    model = TinyClassifier()

    class ClosureSAM(torch.optim.SGD):
        def first_step(self):
            pass

        def second_step(self):
            pass

    optimizer = ClosureSAM(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        SAFTTrainer(model=model, args=make_args(tmp_path), train_dataset=TinyDataset(), optimizers=(optimizer, None))
    with pytest.raises(ValueError, match="lomo"):
        SAFTTrainer(model=model, args=make_args(tmp_path, optim="lomo"), train_dataset=TinyDataset())
    # with SAM off the same optimizer is the user's business
    SAFTTrainer(model=model, args=make_args(tmp_path, sam_rho=0.0), train_dataset=TinyDataset(), optimizers=(optimizer, None))


def test_arguments_parse_from_command_line_and_yaml(tmp_path):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(SAFTTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--sam_rho", "0.05", "--sam_variant", "sam", "--sam_scope", "weights"]
    )
    assert (args.sam_rho, args.sam_variant, args.sam_scope, args.sam_eta) == (0.05, "sam", "weights", 0.0)
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path}\nsam_eta: 0.01\nsam_sync_perturbation: true\n")
    (args,) = parser.parse_yaml_file(str(config))
    assert args.sam_eta == 0.01 and args.sam_sync_perturbation and args.sam_rho == 0.5
    help_text = parser.format_help()
    for knob in ("sam_rho", "sam_variant", "sam_adaptive", "sam_eta", "sam_scope", "sam_sync_perturbation"):
        assert knob in help_text


# ---------------------------------------------------------------- reporting
def test_logs_model_card_and_flops(tmp_path):
    model = tiny_bert()
    trainer = SAFTTrainer(model=model, args=make_args(tmp_path, max_steps=4, logging_steps=2), train_dataset=TokenDataset())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        for key in ("loss", "sam_perturbed_loss", "sam_perturbation_norm", "sam_grad_norm", "sam_skipped_perturbations"):
            assert key in entry, key
        assert entry["sam_skipped_perturbations"] == 0 and entry["sam_perturbation_norm"] > 0
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- saft" in card and "- asam" in card
    assert "Mitigating Parameter Interference in Model Merging via Sharpness-Aware" in card and "ICLR 2025" in card
    trainer.create_model_card(model_name="tiny")  # idempotent: cited once
    assert (tmp_path / "out" / "README.md").read_text().count("@inproceedings") == 1

    batch = TokenDataset()[0]
    batch = {k: v[None] for k, v in batch.items()}
    off = SAFTTrainer(model=model, args=make_args(tmp_path / "off", sam_rho=0.0), train_dataset=TokenDataset())
    assert off.floating_point_ops(batch) > 0
    assert trainer.floating_point_ops(batch) == 2 * off.floating_point_ops(batch)


# ---------------------------------------------------------------- non-finite first pass
class OverflowingTrainer(RecordingTrainer):
    """Simulates an fp16 overflow: the first-pass gradient is non-finite on every micro-batch."""

    def _scale_for_grad(self, loss):
        return loss * float("inf")


def test_non_finite_first_pass_skips_perturbation_and_keeps_training(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    init = copy.deepcopy(model.state_dict())
    trainer = OverflowingTrainer(model=model, args=make_args(tmp_path), train_dataset=TinyDataset())
    trainer.recorded = []
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["sam_skipped_perturbations"] for entry in logs] == [4, 8]
    plain = replay_sam(TinyClassifier(), init, [trainer.recorded], grad_accum=2, lr=LR, rho=0.0, adaptive=True)
    assert max_difference({k: model.state_dict()[k] for k in plain}, plain) < 1e-6


class ScalerTrainer(RecordingTrainer):
    """Puts a real GradScaler on the accelerator before `train()` prepares the optimizer, so the CPU
    run takes the fp16 code path: scaled backward, unscale before clipping, scaler.step / update."""

    scaler_kwargs = {"init_scale": 2.0**10, "growth_interval": 1000}

    def train(self, *args, **kwargs):
        self.accelerator.scaler = torch.amp.GradScaler("cpu", **self.scaler_kwargs)
        return super().train(*args, **kwargs)


def test_grad_scaler_path_matches_reference(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    init = copy.deepcopy(model.state_dict())
    # max_grad_norm=0: unscaling before clipping is accelerate's job and needs its native fp16 mode (GPU)
    trainer = ScalerTrainer(model=model, args=make_args(tmp_path), train_dataset=TinyDataset())
    trainer.recorded = []
    trainer.train()
    assert float(trainer._scale_for_grad(torch.tensor(0.5))) == pytest.approx(512.0)  # first pass is scaled too
    assert trainer.accelerator.scaler.get_scale() == 2.0**10  # no overflow, no unscale twice
    reference = replay_sam(TinyClassifier(), init, [trainer.recorded], grad_accum=2, lr=LR, rho=0.5, adaptive=True)
    assert max_difference({k: model.state_dict()[k] for k in reference}, reference) < 1e-6


def test_grad_scaler_overflow_skips_perturbation_and_recovers(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    init = copy.deepcopy(model.state_dict())
    data = TinyDataset()
    data.x *= 100  # large logits and loss: loss * 2**127 overflows float32
    trainer = ScalerTrainer(model=model, args=make_args(tmp_path, max_steps=6, logging_steps=1), train_dataset=data)
    trainer.scaler_kwargs = {"init_scale": 2.0**127, "backoff_factor": 2.0**-40, "growth_interval": 1000}
    trainer.recorded = []
    trainer.train()
    skipped = [e["sam_skipped_perturbations"] for e in trainer.state.log_history if "loss" in e]
    assert skipped[0] > 0 and skipped[-1] == skipped[-3], skipped  # overflowed at first, then SAM resumes
    assert trainer.accelerator.scaler.get_scale() < 2.0**127  # the scaler saw the overflow and backed off
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert max_difference(model.state_dict(), init) > 1e-4  # and it trained afterwards


# ---------------------------------------------------------------- bf16 autocast
def test_bf16_autocast_trains_close_to_fp32_reference(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier()
    init = copy.deepcopy(model.state_dict())
    trainer = RecordingTrainer(model=model, args=make_args(tmp_path, bf16=True), train_dataset=TinyDataset())
    trainer.recorded = []
    trainer.train()
    reference = replay_sam(TinyClassifier(), init, [trainer.recorded], grad_accum=2, lr=LR, rho=0.5, adaptive=True)
    diff = max_difference({k: model.state_dict()[k] for k in reference}, reference)
    assert 0 < diff < 2e-2  # autocast really ran (not bit-identical) and SAM still applies
    assert all(e["sam_skipped_perturbations"] == 0 for e in trainer.state.log_history if "loss" in e)


# ---------------------------------------------------------------- resume
def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    def run(output, resume=None, max_steps=4):
        torch.manual_seed(0)
        model = TinyClassifier()
        args = make_args(output, optim="adamw_torch", lr_scheduler_type="linear", learning_rate=0.05,
                         max_steps=max_steps, save_strategy="steps", save_steps=2, max_grad_norm=1.0)
        trainer = SAFTTrainer(model=model, args=args, train_dataset=TinyDataset())
        trainer.train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "full", resume=str(tmp_path / "full" / "out" / "checkpoint-2"))
    assert max_difference(full.state_dict(), resumed.state_dict()) < 1e-7
    assert max_difference(full.state_dict(), TinyClassifier().state_dict()) > 1e-3


# ---------------------------------------------------------------- Seq2Seq twin
def test_seq2seq_twin_with_tiny_t5_reduces_loss(tmp_path):
    torch.manual_seed(0)
    config = T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
    model = T5ForConditionalGeneration(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 32, (16, 6), generator=g)
    data = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.flip(0)} for x in ids]
    args = SAFTSeq2SeqTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=30, learning_rate=3e-3,
        logging_steps=5, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
        sam_rho=0.05, sam_adaptive=False,
    )
    trainer = SAFTSeq2SeqTrainer(model=model, args=args, train_dataset=data)
    assert isinstance(trainer, SAFTTrainerMixin)  # the SAM logic is written once
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0], losses
    assert all("sam_perturbed_loss" in e for e in trainer.state.log_history if "loss" in e)


# ---------------------------------------------------------------- exception safety
class FailingSecondPass(SAFTTrainer):
    calls = 0

    def compute_loss(self, *args, **kwargs):
        type(self).calls += 1
        if type(self).calls == 2:  # the perturbed pass of the first micro-batch
            raise RuntimeError("boom in the second pass")
        return super().compute_loss(*args, **kwargs)


def test_failure_in_second_pass_leaves_weights_unperturbed(tmp_path):
    torch.manual_seed(0)
    model = TinyClassifier(batchnorm=True)
    init = copy.deepcopy(model.state_dict())
    trainer = FailingSecondPass(model=model, args=make_args(tmp_path), train_dataset=TinyDataset())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    for name, value in model.state_dict().items():
        if not name.startswith("norm.running") and name != "norm.num_batches_tracked":
            assert torch.equal(value, init[name]), name
