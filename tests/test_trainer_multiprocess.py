"""SAFTTrainer under torchrun (2 processes, gloo, CPU): DDP and DeepSpeed ZeRO-1/2/3.

One launch trains every configuration in turn (process start-up and imports dominate, ~1 min in all)
and the tests compare each run's final weights with the hand-written replay of the micro-batches each
rank saw: local (per-rank) perturbation for DDP and ZeRO-1/2 unless synced, globally reduced for
ZeRO-3 (forced even when sam_sync_perturbation=False). The replay with the other sync mode must NOT
match, so a wrong sync mode is caught. The same launch trains a toy SAM variant registered from test
code (tests/multiproc/toy_sam_variant.py) under DDP and ZeRO: the variant seam works in every mode.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import find_free_port
from multiproc import toy_sam_variant
from multiproc.sam_reference import TinyClassifier, max_difference, replay_sam

pytestmark = pytest.mark.usefixtures("single_thread_torch")  # the replays run in this process

WORKER = Path(__file__).parent / "multiproc" / "train_worker.py"
# backend:grad_accum:mode -> sync mode the result must match
RUNS = {
    "ddp:1:local": False,
    "ddp:1:sync": True,
    "ddp:2:local": False,
    "ddp:2:sync": True,
    "zero1:2:local": False,
    "zero2:2:local": False,
    "zero3:2:local": True,  # ZeRO-3 shards the weights: the perturbation is always the global one
}
# the toy variant (registered from test code): sign-SAM perturbation + a before-optimizer-step gradient hook
TOY = toy_sam_variant.NAME
TOY_RUNS = {
    f"ddp:2:local:{TOY}": False,
    f"ddp:2:sync:{TOY}": True,
    f"zero1:2:local:{TOY}": False,
    f"zero2:2:local:{TOY}": False,
    f"zero3:2:local:{TOY}": True,
}


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    if shutil.which("gcc") is None and shutil.which("c++") is None:
        pytest.skip("DeepSpeed on CPU JIT-compiles a small op and needs a C++ compiler")
    out = tmp_path_factory.mktemp("multiproc")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
    env["SAFT_TEST_SAM_VARIANT_MODULES"] = toy_sam_variant.__name__
    # DDP runs first (DeepSpeed leaves process-wide state behind)
    runs = sorted([*RUNS, *TOY_RUNS], key=lambda spec: not spec.startswith("ddp"))
    cmd = _torchrun() + [
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(find_free_port()),
        str(WORKER), "--out", str(out), "--runs", *runs,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out


def _load(out: Path, spec: str):
    run = out / spec.replace(":", "_")
    result = torch.load(run / "result.pt")
    batches = [torch.load(run / f"batches_rank{r}.pt") for r in range(result["world"])]
    return result, batches


@pytest.mark.multiprocess
@pytest.mark.parametrize("spec", list(RUNS))
def test_matches_replay_with_right_sync_mode_only(launched, spec):
    result, batches = _load(launched, spec)
    grad_accum = int(spec.split(":")[1])
    assert result["world"] == 2
    assert len(batches[0]) == 3 * grad_accum and len(batches[1]) == 3 * grad_accum
    assert not torch.equal(batches[0][0]["x"], batches[1][0]["x"]), "ranks must see different data"

    def reference(sync):
        return replay_sam(
            TinyClassifier(), result["init"], batches, grad_accum=grad_accum, lr=0.1, rho=0.5,
            adaptive=True, sync=sync,
        )

    expected_sync = RUNS[spec]
    right, wrong = reference(expected_sync), reference(not expected_sync)
    final = {k: result["final"][k] for k in right}
    assert max_difference(final, right) < 1e-6
    assert max_difference(final, wrong) > 1e-4, "the replay cannot tell the sync modes apart"


@pytest.mark.multiprocess
@pytest.mark.parametrize("spec", list(TOY_RUNS))
def test_toy_variant_from_test_code_matches_its_replay(launched, spec):
    result, batches = _load(launched, spec)
    assert result["strategy"] == {"class": "SignSAM", "state": {"optimizer_steps": 3}}

    def reference(sync):
        return replay_sam(
            TinyClassifier(), result["init"], batches, grad_accum=2, lr=0.1 * toy_sam_variant.GRADIENT_FACTOR,
            rho=0.5, adaptive=False, sync=sync, perturbation=toy_sam_variant.replay_perturbation(0.5),
        )

    right, wrong = reference(TOY_RUNS[spec]), reference(not TOY_RUNS[spec])
    final = {k: result["final"][k] for k in right}
    assert max_difference(final, right) < 1e-6
    assert max_difference(final, wrong) > 1e-4, "the replay cannot tell the sync modes apart"


@pytest.mark.multiprocess
def test_sam_metrics_are_logged_on_every_backend(launched):
    for spec in [*RUNS, *TOY_RUNS]:
        result, _ = _load(launched, spec)
        assert len(result["logs"]) == 3, spec
        for entry in result["logs"]:
            assert entry["sam_skipped_perturbations"] == 0
            assert entry["sam_perturbation_norm"] > 0 and entry["sam_perturbed_loss"] > 0
