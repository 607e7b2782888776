"""Every SAM variant under torchrun (2 processes, gloo, CPU): DDP (both sync modes), DeepSpeed ZeRO-1/2/3 and
FSDP2 (`fully_shard` through Accelerate, float32 and a MixedPrecisionPolicy with bf16 compute).

One launch trains every (variant, mode) run in turn; each run's final weights are compared with the
hand-written replay of its paper's algorithm (tests/multiproc/variant_reference.py) over the micro-batches
each rank saw, with gradient accumulation 2. The replay with the other sync mode must NOT match. ZeRO-3
always shares one perturbation (synced), ZeRO-1/2 perturb per rank unless synced, like ASAM; so does FSDP2
(sharded weights: one perturbation, each rank perturbing its shard). Under bf16 compute the run is compared
with the float32 replay at a looser tolerance.
The DeepSpeed and FSDP2 runs take minutes on a loaded CPU: they are marked slow; DDP runs are in the default run.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import find_free_port
from multiproc import variant_reference as ref
from multiproc.sam_reference import TinyClassifier, max_difference

pytestmark = pytest.mark.usefixtures("single_thread_torch")

WORKER = Path(__file__).parent / "multiproc" / "train_worker.py"
RHO, SEED, STEPS = 0.5, 3, 3  # the worker's sam_rho, seed and max_steps


def step_fn(variant: str, sync: bool):
    """The replay of `variant` with the worker's knobs (each variant's defaults)."""
    name, _, interval = variant.partition("@")
    if name == "looksam":
        return ref.looksam_step(RHO, k=5, alpha=0.7, sync=sync)
    if name == "gsam":
        return ref.gsam_step(RHO, 0.4, sync=sync)
    if name == "rwp":
        return ref.rwp_step(0.05, SEED, sync=sync)
    if name == "esam":
        return ref.esam_step(RHO, 0.6, 0.5, SEED, sync=sync)
    if name == "fsam":
        return ref.fsam_step(RHO, 1.0, sync=sync)
    if name == "asam":
        return ref.sam_or_plain_step(RHO, int(interval), sync=sync, adaptive=True)
    raise ValueError(variant)


VARIANTS = ["looksam", "gsam", "rwp", "esam", "fsam", "asam@2"]  # asam@2: ASAM with sam_interval=2
DDP_RUNS = {f"ddp:2:{mode}:{v}": mode == "sync" for v in VARIANTS for mode in ("local", "sync")}
DEEPSPEED_RUNS = {f"{backend}:2:local:{v}": backend == "zero3" for v in VARIANTS for backend in ("zero1", "zero2", "zero3")}
FSDP2_RUNS = {f"{backend}:2:local:{v}": True for v in VARIANTS for backend in ("fsdp2", "fsdp2bf16")}
BF16_TOLERANCE = 1e-3  # bf16 forward/backward against the float32 replay (as tests/test_trainer_fsdp2.py)


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def _spec_arg(spec: str) -> str:
    backend, accum, mode, variant = spec.split(":")
    name, _, interval = variant.partition("@")
    return ":".join([backend, accum, mode, name] + ([interval] if interval else []))


def _launch(out: Path, specs, *extra: str) -> Path:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
    cmd = _torchrun() + [
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(find_free_port()),
        str(WORKER), "--out", str(out), "--steps", str(STEPS), "--rho", str(RHO),
        "--runs", *[_spec_arg(s) for s in specs], *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out


@pytest.fixture(scope="module")
def ddp_launch(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("variants_ddp"), DDP_RUNS)


@pytest.fixture(scope="module")
def deepspeed_launch(tmp_path_factory):
    if shutil.which("gcc") is None and shutil.which("c++") is None:
        pytest.skip("DeepSpeed on CPU JIT-compiles a small op and needs a C++ compiler")
    return _launch(tmp_path_factory.mktemp("variants_deepspeed"), DEEPSPEED_RUNS)


def _check(out: Path, spec: str, expected_sync: bool, tolerance: float = 1e-6) -> None:
    run = out / _spec_arg(spec).replace(":", "_")
    result = torch.load(run / "result.pt")
    batches = [torch.load(run / f"batches_rank{r}.pt") for r in range(result["world"])]
    assert result["world"] == 2 and len(batches[0]) == 2 * STEPS
    variant = spec.split(":")[3]

    def replay(sync):
        return ref.replay_steps(TinyClassifier(), result["init"], batches, grad_accum=2, lr=0.1,
                                step_fn=step_fn(variant, sync))

    right, wrong = replay(expected_sync), replay(not expected_sync)
    final = {k: result["final"][k] for k in right}
    diff = max_difference(final, right)
    assert diff < tolerance
    assert max_difference(final, wrong) > max(1e-4, 2 * diff), "the replay cannot tell the sync modes apart"
    assert len(result["logs"]) == STEPS
    assert all(e["sam_skipped_perturbations"] == 0 for e in result["logs"])


@pytest.mark.multiprocess
@pytest.mark.parametrize("spec", list(DDP_RUNS))
def test_variant_under_ddp_matches_replay(ddp_launch, spec):
    _check(ddp_launch, spec, DDP_RUNS[spec])


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("spec", list(DEEPSPEED_RUNS))
def test_variant_under_deepspeed_matches_replay(deepspeed_launch, spec):
    _check(deepspeed_launch, spec, DEEPSPEED_RUNS[spec])


@pytest.fixture(scope="module")
def fsdp2_launch(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("variants_fsdp2"), FSDP2_RUNS)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("spec", list(FSDP2_RUNS))
def test_variant_under_fsdp2_matches_replay(fsdp2_launch, spec):
    bf16 = spec.startswith("fsdp2bf16")
    _check(fsdp2_launch, spec, FSDP2_RUNS[spec], BF16_TOLERANCE if bf16 else 1e-6)
    result = torch.load(fsdp2_launch / _spec_arg(spec).replace(":", "_") / "result.pt")
    assert result["parameter_types"] == ["DTensor"], "the model was not sharded by FSDP2"
    assert result["compute_dtypes"] == (["torch.bfloat16"] if bf16 else ["torch.float32"])
    assert max(result["restore_errors"]) == 0.0, "the variant did not restore the sharded weights exactly"


STATEFUL_FSDP2_RUNS = ["fsdp2:2:local:looksam"]  # LookSAM keeps a sharded direction between refreshes


@pytest.mark.slow
@pytest.mark.multiprocess
def test_stateful_variant_resumes_under_fsdp2(tmp_path):
    """A checkpoint saved mid-run under FSDP2 holds each rank's shard of the variant's state; resuming from it
    re-wraps the shards and ends where the uninterrupted run ends (which itself matches the replay)."""
    out = _launch(tmp_path, STATEFUL_FSDP2_RUNS, "--resume-check")
    for spec in STATEFUL_FSDP2_RUNS:
        _check(out, spec, True)
        result = torch.load(out / _spec_arg(spec).replace(":", "_") / "result.pt")
        assert {"sam_variant_state_rank0.pt", "sam_variant_state_rank1.pt"} <= set(result["checkpoint_files"])
        assert max_difference(result["resumed_final"], result["final"]) < 1e-6
