"""GSAM against a hand-written replay of Zhuang et al. (2022) with gradient accumulation 2."""

import pytest

from multiproc.sam_reference import TinyClassifier, max_difference
from multiproc.variant_reference import gsam_step, replay_steps
from test_trainer import LR, make_args, train_recording

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.mark.parametrize("base,rho,adaptive", [("sam", 0.05, False), ("asam", 0.5, True)])
def test_gsam_matches_replay(tmp_path, base, rho, adaptive):
    trainer, init = train_recording(tmp_path, model_kwargs={"unused_parameter": True, "frozen_first": True},
                                    sam_variant="gsam", sam_base_variant=base, sam_rho=rho, sam_gsam_alpha=0.4)

    def replay(alpha):
        return replay_steps(TinyClassifier(unused_parameter=True, frozen_first=True), init, [trainer.recorded],
                            grad_accum=2, lr=LR, step_fn=gsam_step(rho, alpha, adaptive=adaptive))

    right = replay(0.4)
    trained = {k: trainer.model.state_dict()[k] for k in right}
    assert max_difference(trained, right) < 1e-6
    assert max_difference(trained, replay(0.0)) > 1e-4  # alpha = 0 is SAM/ASAM: must differ
    assert max_difference(trained, replay(-0.4)) > 1e-4  # the sign of the correction matters


def test_gsam_alpha_zero_is_sam(tmp_path):
    gsam, _ = train_recording(tmp_path / "g", sam_variant="gsam", sam_rho=0.05, sam_gsam_alpha=0.0)
    sam, _ = train_recording(tmp_path / "s", sam_variant="sam", sam_rho=0.05)
    assert max_difference(gsam.model.state_dict(), sam.model.state_dict()) < 1e-6


def test_gsam_knobs_are_checked(tmp_path):
    with pytest.raises(ValueError, match="sam_gsam_alpha must be a finite number >= 0"):
        make_args(tmp_path, sam_variant="gsam", sam_rho=0.05, sam_gsam_alpha=float("nan"))
