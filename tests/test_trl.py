"""SAFT inside TRL (SFT, DPO) and inside any Trainer subclass via with_sam / with_sam_args.

Weights after a few SGD steps must equal a hand-written SAM/ASAM replay of the same loss on the
micro-batches the trainer saw (plain torch, full logits: independent of TRL's fused LM head and of
saft_hf.sharpness); the wrong replays (no SAM, the other variant) must not match.
"""

import copy
import dataclasses
import pickle

import pytest
import torch
from transformers import Trainer, TrainingArguments

trl = pytest.importorskip("trl", reason="TRL is not installed: pip install 'saft-hf[trl]' to run the TRL tests")

from multiproc.sam_reference import TinyClassifier, TinyDataset, max_difference, replay_sam  # noqa: E402
from multiproc.tiny_lm import (  # noqa: E402
    build_model,
    build_tokenizer,
    dpo_dataset,
    dpo_loss,
    replay_sam_lm,
    sequence_logps,
    sft_dataset,
    sft_loss,
)
from saft_hf import with_sam, with_sam_args  # noqa: E402
from saft_hf.trl import SAFTDPOConfig, SAFTDPOTrainer, SAFTSFTConfig, SAFTSFTTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread_torch")

LR = 0.1
BETA = 0.5


def sam_kwargs(config_class, adaptive: bool) -> dict:
    """The SAM-variant knob under its current name (sam_variant) or the older boolean (sam_adaptive)."""
    names = {f.name for f in dataclasses.fields(config_class)}
    if "sam_variant" in names:
        return {"sam_variant": "asam" if adaptive else "sam"}
    return {"sam_adaptive": adaptive}


def common_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=3,
        disable_tqdm=True,
        bf16=False,
        gradient_checkpointing=False,
    )
    kwargs.update(overrides)
    return kwargs


def recording(trainer_class):
    """A subclass that keeps (inputs, num_items_in_batch) of every micro-batch, in order."""

    class Recording(trainer_class):
        def training_step(self, model, inputs, num_items_in_batch=None):
            self.recorded.append(({k: v.detach().clone() for k, v in inputs.items()}, num_items_in_batch))
            return super().training_step(model, inputs, num_items_in_batch)

    return Recording


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------- SFT
def train_sft(tmp_path, trainer_class=SAFTSFTTrainer, config_class=SAFTSFTConfig, **overrides):
    model = build_model(seed=0)
    init = copy.deepcopy(model.state_dict())
    trainer = recording(trainer_class)(
        model=model,
        args=config_class(**common_args(tmp_path, **overrides)),
        train_dataset=sft_dataset(),
        processing_class=build_tokenizer(),
    )
    trainer.recorded = []
    trainer.train()
    return trainer, init


def sft_replay(init, trainer, **kwargs):
    batches = [[{**inputs, "num_items": n} for inputs, n in trainer.recorded]]
    return replay_sam_lm(
        build_model(seed=1), init, batches,
        lambda m, names, ps, b: sft_loss(m, names, ps, b, b["num_items"]),
        grad_accum=2, lr=LR, **kwargs,
    )


@pytest.mark.parametrize("adaptive,rho", [(True, 0.5), (False, 0.05)])
def test_sft_matches_hand_written_replay(tmp_path, adaptive, rho):
    trainer, init = train_sft(tmp_path, sam_rho=rho, **sam_kwargs(SAFTSFTConfig, adaptive))
    assert len(trainer.recorded) == 6  # 3 optimizer steps x 2 micro-batches
    trained = trainable_state(trainer.model)
    right = sft_replay(init, trainer, rho=rho, adaptive=adaptive)
    assert max_difference(trained, right) < 1e-6
    plain = sft_replay(init, trainer, rho=0.0, adaptive=adaptive)
    other = sft_replay(init, trainer, rho=rho, adaptive=not adaptive)
    assert max_difference(trained, plain) > 1e-4, "the replay cannot tell SAM from a plain step"
    assert max_difference(trained, other) > 1e-4, "the replay cannot tell SAM from ASAM"
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 3 and all(e["sam_perturbation_norm"] > 0 for e in logs)


def test_sft_counts_each_micro_batch_once(tmp_path):
    """SAM runs compute_loss twice per micro-batch; TRL's token counter and metrics must not double."""
    trainer, _ = train_sft(tmp_path, sam_rho=0.5)
    tokens = sum(int(inputs["attention_mask"].sum()) for inputs, _ in trainer.recorded)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[-1]["num_tokens"] == tokens
    assert all(0.0 <= e["mean_token_accuracy"] <= 1.0 and e["entropy"] > 0 for e in logs)
    # TRL's model card, with SAFT's tags and citation on top
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "saft" in card and "asam" in card and "trl" in card and "lee2025saft" in card


def test_sft_rho_zero_is_bit_identical_to_trl(tmp_path):
    from trl import SFTConfig, SFTTrainer

    overrides = dict(optim="adamw_torch", lr_scheduler_type="linear", max_grad_norm=1.0, learning_rate=1e-3)
    ours, _ = train_sft(tmp_path / "a", sam_rho=0.0, gradient_checkpointing=True, **overrides)
    theirs, _ = train_sft(
        tmp_path / "b", trainer_class=SFTTrainer, config_class=SFTConfig, gradient_checkpointing=True, **overrides
    )
    for (name, a), (_, b) in zip(ours.model.state_dict().items(), theirs.model.state_dict().items()):
        assert torch.equal(a, b), name
    strip = lambda logs: [{k: v for k, v in e.items() if "runtime" not in k and "per_second" not in k} for e in logs]
    assert strip(ours.state.log_history) == strip(theirs.state.log_history)


def test_sft_with_gradient_checkpointing_matches_replay(tmp_path):
    """TRL turns gradient checkpointing on by default; SAM's first pass needs the non-reentrant kind."""
    trainer, init = train_sft(tmp_path, sam_rho=0.5, gradient_checkpointing=True)
    assert max_difference(trainable_state(trainer.model), sft_replay(init, trainer, rho=0.5, adaptive=True)) < 1e-6


def test_sft_lora_through_peft_config(tmp_path):
    from peft import LoraConfig

    model = build_model(seed=0)
    base = copy.deepcopy(model.state_dict())
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = recording(SAFTSFTTrainer)(
        model=model,
        args=SAFTSFTConfig(**common_args(tmp_path, sam_rho=0.5, sam_eta=0.01)),
        train_dataset=sft_dataset(),
        processing_class=build_tokenizer(),
        peft_config=config,
    )
    trainer.recorded = []
    init = copy.deepcopy(trainer.model.state_dict())
    trainer.train()
    peft_model = trainer.model
    trained = trainable_state(peft_model)
    assert trained and all("lora_" in n for n in trained)
    # a fresh PeftModel: a deepcopy of the trained one would keep TRL's patched forward bound to the original
    from peft import get_peft_model

    replay_model = get_peft_model(build_model(seed=1), copy.deepcopy(config))
    batches = [[{**inputs, "num_items": n} for inputs, n in trainer.recorded]]
    loss = lambda m, names, ps, b: sft_loss(m, names, ps, b, b["num_items"])
    right = replay_sam_lm(replay_model, init, batches, loss, grad_accum=2, lr=LR, rho=0.5, adaptive=True, eta=0.01)
    plain = replay_sam_lm(replay_model, init, batches, loss, grad_accum=2, lr=LR, rho=0.0, adaptive=True)
    assert max_difference(trained, right) < 1e-6
    assert max_difference(trained, plain) > 1e-5
    # the frozen base is bit-identical (SAM perturbs and restores only the adapters)
    merged_names = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in peft_model.named_parameters()}
    for name, value in base.items():
        if name in merged_names:
            assert torch.equal(merged_names[name].detach(), value), name


# ---------------------------------------------------------------------------- DPO
class _LogpsRecorder:
    """Forward hook recording the per-token log-probs a (fused-head) forward returns, tagged policy/ref."""

    def __init__(self, module, tag_fn):
        self.calls = []
        self.handle = module.register_forward_hook(self)
        self.tag_fn = tag_fn

    def __call__(self, module, args, output):
        if getattr(output, "log_probs", None) is not None:
            self.calls.append((self.tag_fn(), output.log_probs.detach().clone()))


def _pairs(calls, tag):
    tensors = [t for g, t in calls if g == tag]
    assert len(tensors) % 2 == 0
    return list(zip(tensors[0::2], tensors[1::2]))  # (first pass, second pass) per micro-batch


def train_dpo(tmp_path, rho, adaptive=True, **overrides):
    model = build_model(seed=0)
    ref_model = build_model(seed=0)
    init = copy.deepcopy(model.state_dict())
    trainer = recording(SAFTDPOTrainer)(
        model=model,
        ref_model=ref_model,
        args=SAFTDPOConfig(**common_args(tmp_path, beta=BETA, sam_rho=rho, **sam_kwargs(SAFTDPOConfig, adaptive),
                                         **overrides)),
        train_dataset=dpo_dataset(),
        processing_class=build_tokenizer(),
    )
    trainer.recorded = []
    recorder = _LogpsRecorder(trainer.ref_model, lambda: "ref")
    trainer.train()
    recorder.handle.remove()
    return trainer, init, recorder


@pytest.mark.parametrize("adaptive,rho", [(True, 0.5), (False, 0.05)])
def test_dpo_matches_replay_and_leaves_reference_untouched(tmp_path, adaptive, rho):
    trainer, init, recorder = train_dpo(tmp_path, rho, adaptive)
    assert len(trainer.recorded) == 6
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all(torch.isfinite(torch.tensor(e["loss"])) and e["sam_perturbation_norm"] > 0 for e in logs)
    # the explicit reference model: same outputs in both passes of every micro-batch, weights unchanged
    pairs = _pairs(recorder.calls, "ref")
    assert len(pairs) == 6 and all(torch.equal(a, b) for a, b in pairs)
    for name, value in trainer.ref_model.state_dict().items():
        assert torch.equal(value, init[name]), name

    ref = build_model(seed=1)
    ref.load_state_dict(init)
    batches = [[{**inputs, "ref_logps": sequence_logps(ref, inputs)} for inputs, _ in trainer.recorded]]
    loss = lambda m, names, ps, b: dpo_loss(m, names, ps, b, b["ref_logps"], BETA)
    kwargs = dict(grad_accum=2, lr=LR, divide_by_accum=True)
    trained = trainable_state(trainer.model)
    right = replay_sam_lm(build_model(seed=1), init, batches, loss, rho=rho, adaptive=adaptive, **kwargs)
    plain = replay_sam_lm(build_model(seed=1), init, batches, loss, rho=0.0, adaptive=adaptive, **kwargs)
    other = replay_sam_lm(build_model(seed=1), init, batches, loss, rho=rho, adaptive=not adaptive, **kwargs)
    assert max_difference(trained, right) < 1e-6
    assert max_difference(trained, plain) > 1e-5
    assert max_difference(trained, other) > 1e-5


def test_dpo_with_precomputed_reference_logps_matches_replay(tmp_path):
    trainer, init, recorder = train_dpo(tmp_path, 0.5, precompute_ref_log_probs=True)
    assert recorder.calls == []  # the reference ran once, in __init__ (precompute); never during training
    initial = build_model(seed=1)
    initial.load_state_dict(init)
    for inputs, _ in trainer.recorded:
        expected = sequence_logps(initial, inputs)
        got = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        assert torch.allclose(got, expected, atol=1e-5)
    batches = [[{**inputs, "ref_logps": torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])}
                for inputs, _ in trainer.recorded]]
    loss = lambda m, names, ps, b: dpo_loss(m, names, ps, b, b["ref_logps"], BETA)
    right = replay_sam_lm(build_model(seed=1), init, batches, loss, grad_accum=2, lr=LR, rho=0.5, adaptive=True,
                          divide_by_accum=True)
    assert max_difference(trainable_state(trainer.model), right) < 1e-6


def test_dpo_rho_zero_differs_from_sam(tmp_path):
    sam, _, _ = train_dpo(tmp_path / "sam", 0.5)
    plain, _, recorder = train_dpo(tmp_path / "plain", 0.0)
    assert len(recorder.calls) == 6  # one reference forward per micro-batch without SAM
    assert max_difference(trainable_state(sam.model), trainable_state(plain.model)) > 1e-5


def test_dpo_lora_reference_is_the_unperturbed_base(tmp_path):
    """With peft and no ref_model, the reference is the adapter-disabled policy: SAM perturbs only the adapters,
    so the reference log-probs are identical in both passes, and equal to the initial model's."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = build_model(seed=0)
    init = copy.deepcopy(model.state_dict())
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = recording(SAFTDPOTrainer)(
        model=model,
        args=SAFTDPOConfig(**common_args(tmp_path, beta=BETA, sam_rho=0.5, sam_eta=0.01)),
        train_dataset=dpo_dataset(),
        processing_class=build_tokenizer(),
        peft_config=config,
    )
    trainer.recorded = []
    assert trainer.ref_model is None
    base = trainer.model.get_base_model()
    lora_layer = next(m for m in base.modules() if isinstance(m, BaseTunerLayer))
    recorder = _LogpsRecorder(base, lambda: "ref" if lora_layer.disable_adapters else "policy")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    recorder.handle.remove()

    ref_pairs, policy_pairs = _pairs(recorder.calls, "ref"), _pairs(recorder.calls, "policy")
    assert len(ref_pairs) == 6 and len(policy_pairs) == 6
    assert all(torch.equal(a, b) for a, b in ref_pairs), "SAM's perturbation leaked into the reference"
    assert not all(torch.equal(a, b) for a, b in policy_pairs[1:]), "the policy was never perturbed"
    # the reference is the initial model, at every step
    initial = build_model(seed=1)
    initial.load_state_dict(init)
    for (inputs, _), (ref_first, _) in zip(trainer.recorded, ref_pairs):
        mask = inputs["completion_mask"][:, 1:].float()
        expected = sequence_logps(initial, inputs)
        assert torch.allclose((ref_first[:, -mask.size(1):] * mask).sum(1), expected, atol=1e-5)
    after = {n: p.detach() for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert any(not torch.equal(before[n], after[n]) for n in before), "the adapters did not train"
    for n, p in trainer.model.named_parameters():
        if "lora_" not in n:
            assert not p.requires_grad, n


# ---------------------------------------------------------------------------- with_sam on users' classes
@dataclasses.dataclass
class WeightedArguments(TrainingArguments):
    loss_weight: float = dataclasses.field(default=2.0, metadata={"help": "multiplies the loss"})


class WeightedTrainer(Trainer):
    """A user's Trainer subclass with its own constructor argument (before `args`) and its own loss."""

    def __init__(self, model=None, extra_scale=1.0, args=None, **kwargs):
        self.extra_scale = extra_scale
        super().__init__(model=model, args=args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs["loss"] * self.args.loss_weight * self.extra_scale
        return (loss, outputs) if return_outputs else loss


def test_with_sam_args_adds_the_sam_fields_to_a_custom_config(tmp_path):
    from transformers import HfArgumentParser

    config_class = with_sam_args(WeightedArguments)
    assert config_class.__name__ == "SAFTWeightedArguments"
    assert with_sam_args(WeightedArguments) is config_class  # one class per config
    assert with_sam_args(config_class) is config_class
    fields = {f.name for f in dataclasses.fields(config_class)}
    assert {"loss_weight", "sam_rho", "sam_eta", "output_dir"} <= fields
    (parsed,) = HfArgumentParser(config_class).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--sam_rho", "0.25", "--loss_weight", "3", "--use_cpu", "true"]
    )
    assert parsed.sam_rho == 0.25 and parsed.loss_weight == 3.0
    assert pickle.loads(pickle.dumps(parsed)).sam_rho == 0.25  # Trainer saves its args with torch.save
    with pytest.raises(ValueError, match="sam_rho"):
        config_class(output_dir=str(tmp_path), sam_rho=-1.0)
    with pytest.raises(TypeError, match="TrainingArguments"):
        with_sam_args(dataclasses.make_dataclass("NotArgs", [("x", int, 0)]))


def test_with_sam_on_a_custom_trainer_matches_replay(tmp_path):
    config_class = with_sam_args(WeightedArguments)
    trainer_class = with_sam(WeightedTrainer, config_class)
    assert trainer_class.__name__ == "SAFTWeightedTrainer" and with_sam(WeightedTrainer, config_class) is trainer_class
    torch.manual_seed(0)
    model = TinyClassifier()
    init = copy.deepcopy(model.state_dict())
    args = config_class(
        **{k: v for k, v in common_args(tmp_path, max_steps=4).items() if k not in ("bf16", "gradient_checkpointing")},
        loss_weight=3.0,
        sam_rho=0.5,
    )
    recorded = []

    class Recording(trainer_class):
        def training_step(self, model, inputs, num_items_in_batch=None):
            recorded.append({k: v.detach().clone() for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    # positional call in the user's own order: model, extra_scale, args
    trainer = Recording(model, 0.5, args, train_dataset=TinyDataset())
    assert trainer.extra_scale == 0.5 and trainer.args is args
    trainer.train()
    assert len(recorded) == 8
    # ASAM's e is invariant to the loss scale 3 * 0.5; the SGD step sees the scaled gradient: lr * 1.5
    reference = replay_sam(TinyClassifier(), init, [recorded], grad_accum=2, lr=LR * 1.5, rho=0.5, adaptive=True)
    plain = replay_sam(TinyClassifier(), init, [recorded], grad_accum=2, lr=LR * 1.5, rho=0.0, adaptive=True)
    trained = {k: v for k, v in trainer.model.state_dict().items() if k in reference}
    assert max_difference(trained, reference) < 1e-6
    assert max_difference(trained, plain) > 1e-4


def test_with_sam_rejects_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="transformers.Trainer"):
        with_sam(dict)
    with pytest.raises(TypeError, match="with_sam_args"):
        with_sam(WeightedTrainer, WeightedArguments)
    trainer_class = with_sam(WeightedTrainer, with_sam_args(WeightedArguments))
    plain = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(TypeError, match="SAFTWeightedArguments"):
        trainer_class(model=TinyClassifier(), args=plain, train_dataset=TinyDataset())
    from trl import SFTConfig

    with pytest.raises(TypeError, match="SAFTSFTConfig"):
        SAFTSFTTrainer(
            model=build_model(),
            args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False),
            processing_class=build_tokenizer(),
        )


def test_trl_classes_keep_the_trl_interfaces(tmp_path):
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    assert issubclass(SAFTSFTTrainer, SFTTrainer) and issubclass(SAFTDPOTrainer, DPOTrainer)
    assert issubclass(SAFTSFTConfig, SFTConfig) and issubclass(SAFTDPOConfig, DPOConfig)
    assert SAFTSFTConfig.__module__ == "saft_hf.trl" and SAFTSFTTrainer.__module__ == "saft_hf.trl"
    config = SAFTDPOConfig(output_dir=str(tmp_path), beta=0.3, sam_rho=0.1, use_cpu=True)
    assert pickle.loads(pickle.dumps(config)).beta == 0.3
    import inspect

    assert list(inspect.signature(SAFTDPOTrainer).parameters)[:3] == ["model", "ref_model", "args"]


def test_missing_trl_names_the_extra(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now raises ImportError
    monkeypatch.delitem(sys.modules, "saft_hf.trl", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'saft-hf\[trl\]'"):
        importlib.import_module("saft_hf.trl")
