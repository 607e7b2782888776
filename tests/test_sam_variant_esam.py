"""ESAM (stochastic weight perturbation + sharpness-sensitive data selection) against a hand-written replay."""

import pytest
import torch

from multiproc.sam_reference import TinyClassifier, max_difference
from multiproc.variant_reference import esam_step, replay_steps
from saft_hf.sam_variants.esam import per_example_losses
from test_trainer import LR, make_args, train_recording

pytestmark = pytest.mark.usefixtures("single_thread_torch")
SEED = 3


@pytest.mark.parametrize("base,rho,adaptive", [("sam", 0.05, False), ("asam", 0.5, True)])
def test_esam_matches_replay(tmp_path, base, rho, adaptive):
    trainer, init = train_recording(tmp_path, sam_variant="esam", sam_base_variant=base, sam_rho=rho,
                                    sam_esam_beta=0.6, sam_esam_gamma=0.5)

    def replay(beta, gamma, seed=SEED):
        return replay_steps(TinyClassifier(), init, [trainer.recorded], grad_accum=2, lr=LR,
                            step_fn=esam_step(rho, beta, gamma, seed, adaptive=adaptive))

    trained = {k: v for k, v in trainer.model.state_dict().items() if k in init}
    assert max_difference(trained, replay(0.6, 0.5)) < 1e-6
    assert max_difference(trained, replay(0.6, 1.0)) > 1e-4  # the data selection matters
    assert max_difference(trained, replay(1.0, 0.5)) > 1e-4  # so does the weight selection
    assert max_difference(trained, replay(0.6, 0.5, seed=SEED + 5)) > 1e-4  # and which tensors


def test_esam_with_beta_and_gamma_one_is_sam(tmp_path):
    esam, _ = train_recording(tmp_path / "e", sam_variant="esam", sam_rho=0.05, sam_esam_beta=1.0, sam_esam_gamma=1.0)
    sam, _ = train_recording(tmp_path / "s", sam_variant="sam", sam_rho=0.05)
    assert max_difference(esam.model.state_dict(), sam.model.state_dict()) < 1e-6


def test_esam_data_selection_refuses_models_without_per_example_losses():
    with pytest.raises(NotImplementedError, match="sam_esam_gamma=1"):
        per_example_losses({"logits": torch.zeros(2, 5, 3)}, {"labels": torch.zeros(2, 5, dtype=torch.long)})


def test_esam_knobs_are_checked(tmp_path):
    for knob, bad in (("sam_esam_beta", 0.0), ("sam_esam_gamma", 1.5), ("sam_esam_beta", "0.5")):
        with pytest.raises(ValueError, match=f"{knob} must be a number in"):
            make_args(tmp_path, sam_variant="esam", sam_rho=0.05, **{knob: bad})
