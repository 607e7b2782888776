"""sam_interval=k (SAM every k-th optimizer step, plain steps between) against a hand-written replay."""

import pytest
import torch

from multiproc.sam_reference import TinyClassifier, max_difference
from multiproc.variant_reference import replay_steps, sam_or_plain_step
from test_trainer import LR, make_args, train_recording

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.mark.parametrize("variant,rho,adaptive", [("asam", 0.5, True), ("sam", 0.05, False)])
def test_interval_matches_replay_and_counts_passes(tmp_path, variant, rho, adaptive):
    trainer, init = train_recording(tmp_path, sam_variant=variant, sam_rho=rho, sam_interval=3, max_steps=5)
    replay = lambda k: replay_steps(TinyClassifier(), init, [trainer.recorded], grad_accum=2, lr=LR,  # noqa: E731
                                    step_fn=sam_or_plain_step(rho, k, adaptive=adaptive))
    trained = {k: v for k, v in trainer.model.state_dict().items() if k in init}
    assert max_difference(trained, replay(3)) < 1e-6
    assert max_difference(trained, replay(1)) > 1e-4  # SAM on every step trains differently
    assert max_difference(trained, replay(2)) > 1e-4  # so does another interval
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all(e["sam_skipped_perturbations"] == 0 for e in logs)


def test_interval_skips_the_first_pass_on_plain_steps(tmp_path):
    calls = []
    from saft_hf import SAFTTrainer

    original = SAFTTrainer.compute_loss

    def counting(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return original(self, *args, **kwargs)

    SAFTTrainer.compute_loss = counting
    try:
        train_recording(tmp_path, sam_interval=2, max_steps=4)
    finally:
        SAFTTrainer.compute_loss = original
    # steps 0 and 2: two passes per micro-batch (2 micro-batches); steps 1 and 3: one
    assert [calls.count(s) for s in range(4)] == [4, 2, 4, 2]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_interval_must_be_a_positive_integer(tmp_path, bad):
    with pytest.raises(ValueError, match="sam_interval must be an integer >= 1"):
        make_args(tmp_path, sam_interval=bad)


def test_interval_one_is_plain_asam(tmp_path):
    torch.manual_seed(0)
    a, _ = train_recording(tmp_path / "a", sam_interval=1)
    b, _ = train_recording(tmp_path / "b")
    assert max_difference(a.model.state_dict(), b.model.state_dict()) == 0.0
