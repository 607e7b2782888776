"""The SAM-variant seam: registry, `sam_variant` / deprecated `sam_adaptive`, strict knob validation,
a variant registered from test code (single process; DDP/ZeRO in test_trainer_multiprocess.py),
steps without a first pass, variant state in checkpoints, the weight-norm scope rule, frozen models,
and the SAM log means after resume."""

import copy
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from transformers import HfArgumentParser, TrainingArguments
from transformers import Trainer as HFTrainer

from multiproc import toy_sam_variant
from multiproc.sam_reference import TinyClassifier, TinyDataset, max_difference, replay_sam
from saft_hf import SAFTTrainer, SAFTTrainingArguments, sharpness
from saft_hf.args import build_sharpness_mixin
from saft_hf.sam_variants import (
    SAMVariant,
    get_sam_variant,
    register_sam_variant,
    sam_variant_names,
    unregister_sam_variant,
)
from saft_hf.sam_variants.sam import ASAM
from test_trainer import LR, RecordingTrainer, make_args

pytestmark = pytest.mark.usefixtures("single_thread_torch")


# ---------------------------------------------------------------- registry and arguments
def test_builtin_variants_and_unknown_name_lists_the_valid_ones(tmp_path):
    assert {"sam", "asam"} <= set(sam_variant_names())
    assert get_sam_variant("asam").model_card_tags == ("asam",)
    with pytest.raises(ValueError, match=r"Unknown sam_variant 'asma'.*asam.*sam"):
        make_args(tmp_path, sam_variant="asma")


def test_registering_a_taken_name_needs_replace():
    with pytest.raises(ValueError, match="already registered"):
        @register_sam_variant("asam")
        class Other(SAMVariant):
            pass
    with pytest.raises(TypeError, match="SAMVariant"):
        register_sam_variant("not-a-variant")(object)
    assert get_sam_variant("asam") is ASAM


def test_default_is_asam_and_explicit_variant_parses_everywhere(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning without sam_adaptive
        args = make_args(tmp_path)
        assert args.sam_variant == "asam" and type(args.sam_variant) is str and args.sam_adaptive is None
        assert make_args(tmp_path, sam_variant="sam").sam_variant == "sam"
    parser = HfArgumentParser(SAFTTrainingArguments)
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path}\nsam_variant: sam\nsam_rho: 0.05\n")
    (args,) = parser.parse_yaml_file(str(config))
    assert args.sam_variant == "sam"


@pytest.mark.parametrize("adaptive,variant", [(True, "asam"), (False, "sam")])
def test_sam_adaptive_is_a_deprecated_alias(tmp_path, adaptive, variant):
    with pytest.warns(FutureWarning, match=f"sam_variant='{variant}'"):
        args = make_args(tmp_path, sam_adaptive=adaptive)
    assert args.sam_variant == variant and args.sam_adaptive is None
    with pytest.warns(FutureWarning):  # consistent pair: fine
        assert make_args(tmp_path, sam_adaptive=adaptive, sam_variant=variant).sam_variant == variant
    parser = HfArgumentParser(SAFTTrainingArguments)
    with pytest.warns(FutureWarning):
        (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--sam_adaptive", str(adaptive)])
    assert args.sam_variant == variant


@pytest.mark.parametrize("adaptive,variant", [(False, "asam"), (True, "sam"), (True, "test-signsam")])
def test_inconsistent_sam_adaptive_and_sam_variant_raise(tmp_path, adaptive, variant):
    with pytest.raises(ValueError, match="contradicts sam_variant"):
        make_args(tmp_path, sam_adaptive=adaptive, sam_variant=variant)
    parser = HfArgumentParser(SAFTTrainingArguments)
    with pytest.raises(ValueError, match="contradicts"):
        parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--sam_adaptive", str(adaptive), "--sam_variant", variant])


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"sam_rho": float("inf")}, "sam_rho must be a finite"),
        ({"sam_rho": float("nan")}, "sam_rho must be a finite"),
        ({"sam_rho": "0.5"}, "sam_rho must be a number"),
        ({"sam_rho": True}, "sam_rho must be a number"),
        ({"sam_eta": float("inf")}, "sam_eta must be a finite"),
        ({"sam_eta": [0.01]}, "sam_eta must be a number"),
        ({"sam_adaptive": "false"}, "sam_adaptive must be True or False.*without quotes"),
        ({"sam_adaptive": 0}, "sam_adaptive must be True or False"),
        ({"sam_sync_perturbation": "false"}, "sam_sync_perturbation must be True or False"),
        ({"sam_sync_perturbation": 1}, "sam_sync_perturbation must be True or False"),
        ({"sam_scope": ["all"]}, "sam_scope"),
        ({"sam_variant": 3}, "sam_variant must be a string"),
        ({"sam_variant": "ASAM "}, "Unknown sam_variant"),
        ({"sam_variant": "sam", "sam_eta": 0.01}, "sam_eta"),
    ],
)
def test_every_sam_knob_is_type_and_finiteness_checked(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **overrides)


def test_integer_knobs_are_accepted_as_floats(tmp_path):
    args = make_args(tmp_path, sam_rho=1, sam_eta=0)
    assert args.sam_rho == 1.0 and isinstance(args.sam_rho, float)


def test_a_variant_module_can_add_its_own_sam_knobs(tmp_path):
    """`SAMVariant.arguments` dataclasses are mixed into the arguments (for variants in the package)."""

    @dataclass
    class ToyKnobs:
        sam_toy_period: int = field(default=5, metadata={"help": "toy: refresh period"})

    @dataclass
    class Args(build_sharpness_mixin((ToyKnobs,)), TrainingArguments):
        pass

    parser = HfArgumentParser(Args)
    assert "sam_toy_period" in parser.format_help() and "sam_variant" in parser.format_help()
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--sam_toy_period", "7"])
    assert args.sam_toy_period == 7 and args.sam_variant == "asam"


# ---------------------------------------------------------------- a variant from test code, single process
def test_toy_variant_registered_from_test_code_matches_its_replay(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TinyClassifier()
    init = copy.deepcopy(model.state_dict())
    args = make_args(tmp_path, sam_variant=toy_sam_variant.NAME, sam_rho=0.05)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=TinyDataset())
    trainer.recorded = []
    trainer.train()
    assert isinstance(trainer.sam_strategy, toy_sam_variant.SignSAM)
    assert trainer.sam_strategy.optimizer_steps == 4  # before_optimizer_step: once per optimizer step
    assert len(trainer.sam_strategy.first_pass_losses) == 8  # after_second_pass: once per micro-batch
    reference = replay_sam(TinyClassifier(), init, [trainer.recorded], grad_accum=2,
                           lr=LR * toy_sam_variant.GRADIENT_FACTOR, rho=0.05, adaptive=False,
                           perturbation=toy_sam_variant.replay_perturbation(0.05))
    trained = {k: model.state_dict()[k] for k in reference}
    assert max_difference(trained, reference) < 1e-6
    # it is not SAM, nor sign-SAM without the gradient hook
    sam = replay_sam(TinyClassifier(), init, [trainer.recorded], grad_accum=2,
                     lr=LR * toy_sam_variant.GRADIENT_FACTOR, rho=0.05, adaptive=False)
    assert max_difference(trained, sam) > 1e-5
    unhooked = replay_sam(TinyClassifier(), init, [trainer.recorded], grad_accum=2, lr=LR, rho=0.05,
                          adaptive=False, perturbation=toy_sam_variant.replay_perturbation(0.05))
    assert max_difference(trained, unhooked) > 1e-4
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all(e["sam_perturbation_norm"] == pytest.approx(0.05, rel=1e-5) for e in logs)
    # model-card tags come from the variant (Trainer's card needs a HF config: capture the tags instead)
    seen = {}

    def fake_card(self, *args, tags=None, **kwargs):
        seen["tags"] = tags
        (tmp_path / "out" / "README.md").write_text("card\n")

    monkeypatch.setattr(HFTrainer, "create_model_card", fake_card)
    trainer.create_model_card(model_name="tiny")
    assert seen["tags"] == ["saft", "sign-sam"]


def test_variant_state_is_saved_with_checkpoints_and_restored_on_resume(tmp_path):
    def run(resume=None):
        torch.manual_seed(0)
        args = make_args(tmp_path, sam_variant=toy_sam_variant.NAME, sam_rho=0.05, save_strategy="steps", save_steps=2)
        trainer = SAFTTrainer(model=TinyClassifier(), args=args, train_dataset=TinyDataset())
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run()
    assert (tmp_path / "out" / "checkpoint-2" / "sam_variant_state_rank0.pt").is_file()
    resumed = run(resume=str(tmp_path / "out" / "checkpoint-2"))
    assert full.sam_strategy.optimizer_steps == resumed.sam_strategy.optimizer_steps == 4  # 2 restored + 2 run
    assert len(resumed.sam_strategy.first_pass_losses) == 4  # only the 2 steps after the resume ran here
    # resuming with another variant is refused, naming both
    args = make_args(tmp_path, sam_variant="asam", save_strategy="steps", save_steps=2)
    other = SAFTTrainer(model=TinyClassifier(), args=args, train_dataset=TinyDataset())
    with pytest.raises(ValueError, match="sam_variant='test-signsam'.*sam_variant='asam'"):
        other.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


class EveryOtherStepASAM(ASAM):
    """ASAM on even optimizer steps; a plain single-pass step (no first pass) on odd ones."""

    model_card_tags = ("asam", "every-2")

    def takes_first_pass(self, step):
        return step.global_step % 2 == 0

    def perturbation(self, step, grads):
        if grads is None:
            return None
        return super().perturbation(step, grads)


@pytest.fixture
def every_other_step():
    register_sam_variant("test-every-2")(EveryOtherStepASAM)
    yield "test-every-2"
    unregister_sam_variant("test-every-2")


def test_a_variant_can_skip_the_first_pass(tmp_path, every_other_step):
    torch.manual_seed(0)
    model = TinyClassifier()
    init = copy.deepcopy(model.state_dict())

    class Counting(RecordingTrainer):
        passes = 0

        def compute_loss(self, *args, **kwargs):
            type(self).passes += 1
            return super().compute_loss(*args, **kwargs)

    trainer = Counting(model=model, args=make_args(tmp_path, sam_variant=every_other_step), train_dataset=TinyDataset())
    trainer.recorded = []
    trainer.train()
    assert Counting.passes == 2 * 2 * 2 + 2 * 2  # steps 0, 2: two passes per micro-batch; steps 1, 3: one
    state = copy.deepcopy(init)
    for step in range(4):  # replay step by step: ASAM, plain, ASAM, plain
        batches = trainer.recorded[2 * step: 2 * step + 2]
        state.update(replay_sam(TinyClassifier(), state, [batches], grad_accum=2, lr=LR,
                                rho=0.5 if step % 2 == 0 else 0.0, adaptive=True))
    assert max_difference({k: model.state_dict()[k] for k in init}, state) < 1e-6
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["sam_skipped_perturbations"] for e in logs] == [0, 0]  # plain by design is not a skip
    # the logged loss of a single-pass step is that pass's loss, normalised like Trainer's
    assert all(0 < e["loss"] < 5 for e in logs)


class RefusesAccumulation(ASAM):
    def unsupported_reason(self, setup):
        if setup.gradient_accumulation_steps > 1:
            return "toy: gradient accumulation is not supported (set gradient_accumulation_steps=1)."
        return None


def test_unsupported_setup_is_refused_with_the_variants_reason(tmp_path):
    register_sam_variant("test-no-accum")(RefusesAccumulation)
    try:
        with pytest.raises(NotImplementedError, match="sam_variant='test-no-accum'.*gradient_accumulation_steps=1"):
            SAFTTrainer(model=TinyClassifier(), args=make_args(tmp_path, sam_variant="test-no-accum"),
                        train_dataset=TinyDataset())
        SAFTTrainer(model=TinyClassifier(), train_dataset=TinyDataset(),
                    args=make_args(tmp_path, sam_variant="test-no-accum", gradient_accumulation_steps=1))
    finally:
        unregister_sam_variant("test-no-accum")


# ---------------------------------------------------------------- sam_scope="weights" and weight norm
def _weight_normed_classifier():
    torch.manual_seed(0)
    model = TinyClassifier()
    nn.utils.parametrizations.weight_norm(model.fc1)  # fc1.parametrizations.weight.original0/1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        nn.utils.weight_norm(model.fc2)  # the old API: fc2.weight_g / fc2.weight_v
    return model


def test_weights_scope_follows_the_official_rule_on_weight_norm():
    names = [n for n, _ in _weight_normed_classifier().named_parameters()]
    mask = dict(zip(names, sharpness.adaptive_scale_mask(names, "weights")))
    assert mask == {
        "fc1.bias": False,
        "fc1.parametrizations.weight.original0": True,
        "fc1.parametrizations.weight.original1": True,
        "norm.weight": True,
        "norm.bias": False,
        "fc2.bias": False,
        "fc2.weight_g": True,
        "fc2.weight_v": True,
    }


def test_weights_scope_on_a_weight_normed_model_matches_the_replay(tmp_path):
    model = _weight_normed_classifier()
    init = copy.deepcopy(model.state_dict())
    args = make_args(tmp_path, sam_variant="asam", sam_scope="weights", sam_eta=0.01)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=TinyDataset())
    trainer.recorded = []
    trainer.train()
    reference = replay_sam(_weight_normed_classifier(), init, [trainer.recorded], grad_accum=2, lr=LR, rho=0.5,
                           adaptive=True, eta=0.01, scope="weights")
    trained = dict(model.named_parameters())
    assert max_difference({k: trained[k].detach() for k in reference}, reference) < 1e-6
    # the old `endswith("weight")` rule (T = 1 on the weight-normed tensors) trains differently
    biases_only = replay_sam(_weight_normed_classifier(), init, [trainer.recorded], grad_accum=2, lr=LR, rho=0.5,
                             adaptive=True, eta=0.01, scope="all")
    assert max_difference({k: trained[k].detach() for k in reference}, biases_only) > 1e-5


# ---------------------------------------------------------------- frozen model
def test_all_parameters_frozen_is_a_clear_error(tmp_path):
    model = TinyClassifier().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False.*sam_rho=0"):
        SAFTTrainer(model=model, args=make_args(tmp_path), train_dataset=TinyDataset())


# ---------------------------------------------------------------- SAM log means after resume
def test_sam_log_means_after_resume_equal_the_uninterrupted_run(tmp_path):
    def run(resume=None):
        torch.manual_seed(0)
        # resume at a logging boundary, so the uninterrupted run's log at step 6 covers the same steps 5-6
        args = make_args(tmp_path, optim="adamw_torch", learning_rate=0.05, max_steps=6, logging_steps=2,
                         save_strategy="steps", save_steps=2)
        trainer = SAFTTrainer(model=TinyClassifier(), args=args, train_dataset=TinyDataset())
        trainer.train(resume_from_checkpoint=resume)
        return {e["step"]: e for e in trainer.state.log_history if "sam_perturbed_loss" in e}

    full = run()
    resumed = run(resume=str(tmp_path / "out" / "checkpoint-4"))
    assert sorted(full) == sorted(resumed) == [2, 4, 6]  # the resumed history carries the first two logs
    for key in ("sam_perturbed_loss", "sam_perturbation_norm", "sam_grad_norm", "loss"):
        assert resumed[6][key] == pytest.approx(full[6][key], rel=1e-5), key
    assert full[6]["sam_perturbed_loss"] > 0.1


# ---------------------------------------------------------------- the documented example works as written
def test_docs_example_variant_with_its_own_knob_trains(tmp_path):
    import re
    import types
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "extending-sam.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "register_sam_variant" in b]
    module = types.ModuleType("saft_hf.sam_variants._docs_example")
    module.__package__ = "saft_hf.sam_variants"
    try:
        exec(compile(code, "docs/extending-sam.md", "exec"), module.__dict__)
        SignSAM = get_sam_variant("signsam")

        @dataclass
        class Args(build_sharpness_mixin((SignSAM.arguments,)), TrainingArguments):
            pass

        base = make_args(tmp_path).to_dict()
        kwargs = {k: base[k] for k in ("output_dir", "per_device_train_batch_size", "gradient_accumulation_steps",
                                       "max_steps", "learning_rate", "optim", "use_cpu", "report_to",
                                       "save_strategy", "logging_steps", "disable_tqdm", "lr_scheduler_type",
                                       "weight_decay", "max_grad_norm", "seed")}
        with pytest.raises(ValueError, match="sam_sign_scale"):
            Args(**kwargs, sam_variant="signsam", sam_sign_scale=float("inf"))
        args = Args(**kwargs, sam_variant="signsam", sam_rho=0.05, sam_sign_scale=2.0)
        torch.manual_seed(0)
        model = TinyClassifier()
        init = copy.deepcopy(model.state_dict())
        trainer = RecordingTrainer(model=model, args=args, train_dataset=TinyDataset())
        trainer.recorded = []
        trainer.train()
        reference = replay_sam(TinyClassifier(), init, [trainer.recorded], grad_accum=2, lr=LR, rho=0.05,
                               adaptive=False, perturbation=toy_sam_variant.replay_perturbation(0.1))
        assert max_difference({k: model.state_dict()[k] for k in reference}, reference) < 1e-6
    finally:
        unregister_sam_variant("signsam")


# ---------------------------------------------------------------- each variant's paper radius
def test_each_variant_declares_its_papers_radius():
    from saft_hf.sam_variants.base import SAMVariant as Base

    want = {"asam": 0.5, "sam": 0.05, "looksam": 0.05, "gsam": 0.05, "esam": 0.05, "fsam": 0.1, "rwp": None}
    assert {name: get_sam_variant(name).default_rho() for name in want} == want
    # the variants built on SAM/ASAM take ASAM's radius with the adaptive base perturbation
    adaptive = type("Args", (), {"sam_base_variant": "asam"})()
    assert [get_sam_variant(n).default_rho(adaptive) for n in ("looksam", "gsam", "esam")] == [0.5] * 3
    assert Base.default_rho() is None  # a variant registered without a paper radius: no default, no warning


@pytest.mark.parametrize("variant,rho,warns", [("looksam", 0.5, True), ("sam", 0.25, True), ("fsam", 0.5, True),
                                                ("looksam", 0.05, False), ("asam", 0.5, False), ("rwp", 0.5, False),
                                                ("fsam", 0.1, False)])
def test_trainer_warns_when_rho_is_far_above_the_variants_paper_radius(tmp_path, caplog, variant, rho, warns):
    import logging

    caplog.set_level(logging.WARNING, logger="saft_hf.trainer")
    SAFTTrainer(model=TinyClassifier(), args=make_args(tmp_path, sam_variant=variant, sam_rho=rho),
                train_dataset=TinyDataset())
    messages = [r.getMessage() for r in caplog.records if "uses in its paper" in r.getMessage()]
    if warns:
        paper = get_sam_variant(variant).default_rho()
        assert len(messages) == 1 and f"sam_variant={variant!r}" in messages[0], messages
        assert f"Set sam_rho={paper:g}" in messages[0] and f"sam_rho={rho:g} is {rho / paper:.0f}x" in messages[0]
    else:
        assert messages == []
