"""Fisher-SAM against a hand-written replay of Kim et al. (2022), gradient accumulation 2."""

import pytest

from multiproc.sam_reference import TinyClassifier, max_difference
from multiproc.variant_reference import fsam_step, replay_steps
from test_trainer import LR, make_args, train_recording

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_fsam_matches_replay(tmp_path, decay):
    trainer, init = train_recording(tmp_path, model_kwargs={"unused_parameter": True}, sam_variant="fsam",
                                    sam_rho=0.1, sam_fsam_eta=1.0, sam_fsam_decay=decay)

    def replay(eta, decay):
        return replay_steps(TinyClassifier(unused_parameter=True), init, [trainer.recorded], grad_accum=2, lr=LR,
                            step_fn=fsam_step(0.1, eta, decay))

    right = replay(1.0, decay)
    trained = {k: trainer.model.state_dict()[k] for k in right}
    assert max_difference(trained, right) < 1e-6
    assert max_difference(trained, replay(0.0, decay)) > 1e-5  # eta = 0 is SAM: must differ
    assert max_difference(trained, replay(1.0, 0.5 if decay else 0.9)) > 1e-5  # the Fisher estimate matters
    if decay:
        assert set(trainer.sam_strategy.state_dict()["fisher"]) >= {"fc1.weight", "fc2.bias"}


def test_fsam_eta_zero_is_sam(tmp_path):
    fsam, _ = train_recording(tmp_path / "f", sam_variant="fsam", sam_rho=0.05, sam_fsam_eta=0.0)
    sam, _ = train_recording(tmp_path / "s", sam_variant="sam", sam_rho=0.05)
    assert max_difference(fsam.model.state_dict(), sam.model.state_dict()) < 1e-6


def test_fsam_knobs_are_checked(tmp_path):
    with pytest.raises(ValueError, match="sam_fsam_decay must be < 1"):
        make_args(tmp_path, sam_variant="fsam", sam_fsam_decay=1.0)
    with pytest.raises(ValueError, match="sam_fsam_eta must be a finite number >= 0"):
        make_args(tmp_path, sam_variant="fsam", sam_fsam_eta=-1.0)
