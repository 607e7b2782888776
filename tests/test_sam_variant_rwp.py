"""Random weight perturbation (RWP) and Flat-LoRA against hand-written replays, gradient accumulation 2."""

import copy

import pytest
import torch

from multiproc.sam_reference import TinyClassifier, TinyDataset, max_difference
from multiproc.variant_reference import filter_noise, replay_steps, rwp_seed, rwp_step
from saft_hf import SAFTTrainer
from test_trainer import LR, RecordingTrainer, make_args, train_recording

pytestmark = pytest.mark.usefixtures("single_thread_torch")
SEED = 3  # make_args' seed


def test_rwp_matches_replay_and_takes_one_pass(tmp_path):
    passes = []
    original = SAFTTrainer.compute_loss

    def counting(self, *args, **kwargs):
        passes.append(1)
        return original(self, *args, **kwargs)

    SAFTTrainer.compute_loss = counting
    try:
        trainer, init = train_recording(tmp_path, sam_variant="rwp", sam_rho=1.0, sam_rwp_sigma=0.05)
    finally:
        SAFTTrainer.compute_loss = original
    assert len(passes) == 8  # one pass per micro-batch

    def replay(sigma, seed=SEED):
        return replay_steps(TinyClassifier(), init, [trainer.recorded], grad_accum=2, lr=LR,
                            step_fn=rwp_step(sigma, seed))

    trained = {k: v for k, v in trainer.model.state_dict().items() if k in init}
    assert max_difference(trained, replay(0.05)) < 1e-6
    assert max_difference(trained, replay(0.10)) > 1e-5  # the noise level matters
    assert max_difference(trained, replay(0.05, seed=SEED + 1)) > 1e-5  # and which noise
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all(e["sam_perturbation_norm"] > 0 and e["sam_skipped_perturbations"] == 0 for e in logs)


def _lora_classifier(modules_to_save=None):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = TinyClassifier()
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["fc1"], init_lora_weights=False,
                        modules_to_save=modules_to_save)
    return get_peft_model(base, config)


def test_flat_lora_perturbs_the_merged_weight_and_matches_replay(tmp_path):
    model = _lora_classifier(modules_to_save=["fc2"])
    init = copy.deepcopy(model.state_dict())
    args = make_args(tmp_path, sam_variant="rwp", sam_rho=1.0, sam_rwp_sigma=0.05)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=TinyDataset())
    trainer.recorded = []
    trainer.train()
    base_name = "base_model.model.fc1.base_layer.weight"
    assert torch.equal(model.state_dict()[base_name], init[base_name])  # W0 restored exactly

    def replay(full_space):
        """Flat-LoRA: e from the rows of W = W0 + (alpha/r) B A, added to W0; then the head's own e."""
        reference = _lora_classifier(modules_to_save=["fc2"])
        reference.load_state_dict(init)
        names = [n for n, p in reference.named_parameters() if p.requires_grad]
        params = [init[n].clone() for n in names]
        w0 = init[base_name]
        for t in range(4):
            total = [torch.zeros_like(p) for p in params]
            for m in range(2):
                batch = trainer.recorded[2 * t + m]
                current = dict(zip(names, params))
                a = current["base_model.model.fc1.lora_A.default.weight"]
                b = current["base_model.model.fc1.lora_B.default.weight"]
                g = torch.Generator().manual_seed(rwp_seed(SEED, t, m, 0))
                merged = w0 + (4 / 2) * b @ a if full_space else w0
                e_w0 = filter_noise(merged, 0.05, g)
                head = [filter_noise(p, 0.05, g) if "lora" not in n else torch.zeros_like(p)
                        for n, p in zip(names, params)]
                ps = [(p + e).requires_grad_(True) for p, e in zip(params, head)]
                overrides = dict(zip(names, ps))
                overrides[base_name] = w0 + e_w0
                out = torch.func.functional_call(reference, overrides, (), {"x": batch["x"], "labels": batch["labels"]})
                grads = torch.autograd.grad(out["loss"], ps)
                total = [s + gr / 2 for s, gr in zip(total, grads)]
            params = [p - LR * s for p, s in zip(params, total)]
        return dict(zip(names, params))

    right = replay(full_space=True)
    trained = {k: model.state_dict()[k] for k in right}
    assert max_difference(trained, right) < 1e-6
    assert max_difference(trained, replay(full_space=False)) > 1e-4  # filter norms of W0 alone: not Flat-LoRA


def test_rwp_knobs_are_checked(tmp_path):
    with pytest.raises(ValueError, match="sam_rwp_sigma must be > 0"):
        make_args(tmp_path, sam_variant="rwp", sam_rwp_sigma=0.0)
    with pytest.raises(ValueError, match="sam_rwp_sigma must be a finite number"):
        make_args(tmp_path, sam_variant="rwp", sam_rwp_sigma=float("inf"))
