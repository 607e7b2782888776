"""LookSAM against a hand-written replay of Liu et al. (2022), Algorithm 1, with gradient accumulation 2."""

import pytest

from multiproc.sam_reference import TinyClassifier, TinyDataset, max_difference
from multiproc.variant_reference import looksam_step, replay_steps
from saft_hf import SAFTTrainer
from test_trainer import LR, make_args, train_recording

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.mark.parametrize("base,rho,adaptive", [("sam", 0.05, False), ("asam", 0.5, True)])
def test_looksam_matches_replay(tmp_path, base, rho, adaptive):
    trainer, init = train_recording(tmp_path, model_kwargs={"unused_parameter": True}, sam_variant="looksam",
                                    sam_base_variant=base, sam_rho=rho, sam_looksam_k=2, sam_looksam_alpha=0.7,
                                    max_steps=4)

    def replay(k, alpha):
        return replay_steps(TinyClassifier(unused_parameter=True), init, [trainer.recorded], grad_accum=2, lr=LR,
                            step_fn=looksam_step(rho, k, alpha, adaptive=adaptive))

    trained = {k: v for k, v in trainer.model.state_dict().items() if k in init}
    assert max_difference(trained, replay(2, 0.7)) < 1e-6
    assert max_difference(trained, replay(2, 0.0)) > 1e-4  # the reused direction matters
    assert max_difference(trained, replay(2, 1.4)) > 1e-4  # and so does its weight
    assert trainer.sam_strategy.direction is not None


def test_looksam_costs_one_pass_between_refreshes(tmp_path):
    passes = []
    original = SAFTTrainer.compute_loss

    def counting(self, *args, **kwargs):
        passes.append(self.state.global_step)
        return original(self, *args, **kwargs)

    SAFTTrainer.compute_loss = counting
    try:
        train_recording(tmp_path, sam_variant="looksam", sam_rho=0.05, sam_looksam_k=3, max_steps=4)
    finally:
        SAFTTrainer.compute_loss = original
    assert [passes.count(s) for s in range(4)] == [4, 2, 2, 4]


def test_looksam_direction_is_checkpointed(tmp_path):
    args = make_args(tmp_path, sam_variant="looksam", sam_rho=0.05, sam_looksam_k=4, save_strategy="steps",
                     save_steps=2, max_steps=4)
    full = SAFTTrainer(model=TinyClassifier(), args=args, train_dataset=TinyDataset())
    full.train()
    resumed = SAFTTrainer(model=TinyClassifier(), args=args, train_dataset=TinyDataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert max_difference(full.model.state_dict(), resumed.model.state_dict()) < 1e-6


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"sam_looksam_k": 0}, "sam_looksam_k must be an integer >= 1"),
        ({"sam_looksam_alpha": -1.0}, "sam_looksam_alpha must be a finite number >= 0"),
        ({"sam_interval": 2}, "sam_interval=2 with sam_variant='looksam'.*sam_looksam_k"),
        ({"sam_base_variant": "gsam"}, "sam_base_variant must be one of"),
        ({"sam_eta": 0.01}, "sam_eta=0.01 only affects the ASAM perturbation"),
    ],
)
def test_looksam_knobs_are_checked(tmp_path, overrides, match):

    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, sam_variant="looksam", sam_rho=0.05, **overrides)
