"""SAFTTrainer under FSDP2 (`fully_shard` through Accelerate's FSDP plugin, fsdp_version 2), torchrun with
2 processes (gloo, CPU).

FSDP2 shards the weights, so the perturbation is the synced one (from the mean first-pass gradient), like
ZeRO-3: each run must match the synced hand replay (tests/multiproc/sam_reference.py) and NOT the per-rank
one, with gradient accumulation 1 and 2, with sam_sync_perturbation False (forced) and True, for ASAM, SAM
and two toy variants registered from test code (one takes its first pass for a subset of the tensors), and
with a MixedPrecisionPolicy (param_dtype bf16, reduce_dtype float32; looser tolerance). The worker also
checks that every training_step leaves the sharded weights bit-identical to how it found them (exact
restore) and that the first pass leaves every real gradient as it was (.grad shards and the unsharded
gradients FSDP holds for the last micro-batch's reduce-scatter).
A second launch checks the shard-aware reductions of saft_hf.sharpness on uneven DTensor shards.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import find_free_port
from saft_hf import SAFTTrainer, SAFTTrainingArguments
from multiproc import toy_sam_variant
from multiproc.sam_reference import TinyClassifier, TinyDataset, max_difference, replay_sam

pytestmark = pytest.mark.usefixtures("single_thread_torch")

HERE = Path(__file__).parent
TOY = toy_sam_variant.NAME
PARTIAL = toy_sam_variant.PARTIAL_NAME
# run spec -> (variant for the replay, tolerance against the synced replay)
RUNS = {
    "fsdp2:1:local": ("asam", 1e-6),
    "fsdp2:2:local": ("asam", 1e-6),
    "fsdp2:2:sync": ("asam", 1e-6),
    "fsdp2:2:local:sam": ("sam", 1e-6),
    f"fsdp2:2:local:{TOY}": (TOY, 1e-6),
    f"fsdp2:1:local:{PARTIAL}": (PARTIAL, 1e-6),  # first pass for a subset: the other gradients stay out
    f"fsdp2:2:local:{PARTIAL}": (PARTIAL, 1e-6),
    "fsdp2bf16:1:local": ("asam", 1e-3),
    "fsdp2bf16:2:local": ("asam", 1e-3),
}


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def _launch(script: Path, *args: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    env["SAFT_TEST_SAM_VARIANT_MODULES"] = toy_sam_variant.__name__
    cmd = _torchrun() + [
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(find_free_port()),
        str(script), *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    _launch(HERE / "multiproc" / "train_worker.py", "--out", str(out), "--runs", *RUNS)
    return out


def _load(out: Path, spec: str):
    run = out / spec.replace(":", "_")
    result = torch.load(run / "result.pt")
    batches = [torch.load(run / f"batches_rank{r}.pt") for r in range(result["world"])]
    return result, batches


def _replay(result, batches, variant: str, sync: bool):
    grad_accum = len(batches[0]) // 3
    if variant == TOY:
        return replay_sam(
            TinyClassifier(), result["init"], batches, grad_accum=grad_accum,
            lr=0.1 * toy_sam_variant.GRADIENT_FACTOR, rho=0.5, adaptive=False, sync=sync,
            perturbation=toy_sam_variant.replay_perturbation(0.5),
        )
    if variant == PARTIAL:
        return replay_sam(
            TinyClassifier(), result["init"], batches, grad_accum=grad_accum, lr=0.1, rho=0.5, adaptive=False,
            sync=sync, perturbation=toy_sam_variant.replay_partial_perturbation(0.5),
        )
    return replay_sam(
        TinyClassifier(), result["init"], batches, grad_accum=grad_accum, lr=0.1, rho=0.5,
        adaptive=variant == "asam", sync=sync,
    )


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("spec", list(RUNS))
def test_fsdp2_matches_the_synced_replay_only(launched, spec):
    result, batches = _load(launched, spec)
    variant, tolerance = RUNS[spec]
    grad_accum = int(spec.split(":")[1])
    assert result["world"] == 2 and result["parameter_types"] == ["DTensor"], "the model was not sharded by FSDP2"
    assert len(batches[0]) == 3 * grad_accum
    assert not torch.equal(batches[0][0]["x"], batches[1][0]["x"]), "ranks must see different data"
    bf16 = spec.startswith("fsdp2bf16")
    assert result["compute_dtypes"] == (["torch.bfloat16"] if bf16 else ["torch.float32"])

    right, wrong = _replay(result, batches, variant, True), _replay(result, batches, variant, False)
    final = {k: result["final"][k] for k in right}
    assert all(v.dtype == torch.float32 for v in final.values())  # master weights stay float32
    diff = max_difference(final, right)
    assert diff < tolerance
    if bf16:
        assert diff > 1e-6, "bf16 compute should not be bit-identical to the float32 replay"
    assert max_difference(final, wrong) > max(1e-4, 2 * diff), "the replay cannot tell the sync modes apart"

    assert max(result["restore_errors"]) == 0.0, "SAM did not restore the sharded weights exactly"
    assert len(result["restore_errors"]) == 3 * grad_accum
    assert result["first_pass_grad_changes"] == 0, "the first pass changed a gradient"
    if grad_accum > 1:  # the last micro-batch's first pass ran while FSDP held micro-batch 1's gradients
        assert result["pending_unsharded_grads"] == 3
    if variant == TOY:
        assert result["strategy"] == {"class": "SignSAM", "state": {"optimizer_steps": 3}}
    assert len(result["logs"]) == 3
    for entry in result["logs"]:
        assert entry["sam_skipped_perturbations"] == 0
        assert entry["sam_perturbation_norm"] > 0 and entry["sam_perturbed_loss"] > 0


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sharpness_reductions_over_uneven_shards(tmp_path):
    _launch(HERE / "multiproc" / "sharded_reductions_worker.py", "--out", str(tmp_path))
    checks = json.loads((tmp_path / "sharded_reductions.json").read_text())
    assert len(checks) == 19
    for name, difference in checks.items():
        assert difference < 2e-6, (name, difference)
    for exact in ("perturbed", "restored_exactly", "shard_like", "all_reduce_mean_leaves_shards", "global_max_abs",
                  "state_round_trip"):
        assert checks[exact] == 0.0, exact


# ---------------------------------------------------------------- construction (single process)
def _trainer_claiming_fsdp(tmp_path, monkeypatch, version: int, **overrides) -> SAFTTrainer:
    """A single-process trainer whose accelerator reports an FSDP plugin of `version` (FSDP itself needs a launch)."""
    args = SAFTTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=1, **overrides)
    trainer = SAFTTrainer(model=TinyClassifier(), args=args, train_dataset=TinyDataset())
    trainer.is_fsdp_enabled = True
    monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", type("Plugin", (), {"fsdp_version": version})(),
                        raising=False)
    return trainer


def test_fsdp1_is_refused_with_the_fix_named(tmp_path, monkeypatch):
    trainer = _trainer_claiming_fsdp(tmp_path, monkeypatch, 1)
    expected = r"FSDP1 \(fsdp_version=1\).*Use FSDP2 \(fsdp_config=\{'version': 2\}"
    with pytest.raises(NotImplementedError, match=expected):
        trainer._check_sam_support()


def test_fsdp2_is_accepted_and_syncs_the_perturbation(tmp_path, monkeypatch, caplog):
    trainer = _trainer_claiming_fsdp(tmp_path, monkeypatch, 2, sam_sync_perturbation=False)
    with caplog.at_level("INFO", logger="saft_hf.trainer"):
        trainer._check_sam_support()
    assert "FSDP2 shards the parameters" in caplog.text
    assert trainer._sam_training_setup().distributed == "fsdp2"


def test_a_variant_can_refuse_fsdp2(tmp_path, monkeypatch):
    from saft_hf.sam_variants import SAMVariant

    class NoFSDP(SAMVariant):
        def unsupported_reason(self, setup):
            return "needs whole tensors" if setup.distributed == "fsdp2" else None

    trainer = _trainer_claiming_fsdp(tmp_path, monkeypatch, 2)
    trainer.sam_strategy = NoFSDP(trainer.args)
    with pytest.raises(NotImplementedError, match="cannot run in this set-up: needs whole tensors"):
        trainer._check_sam_support()
