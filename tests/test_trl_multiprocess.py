"""SAFTSFTTrainer under torchrun DDP (2 processes, gloo, CPU) equals the hand SAM replay of what each rank saw."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason="TRL is not installed: pip install 'saft-hf[trl]' to run the TRL tests")

from conftest import find_free_port  # noqa: E402
from multiproc.sam_reference import max_difference  # noqa: E402
from multiproc.tiny_lm import build_model, replay_sam_lm, sft_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread_torch")

WORKER = Path(__file__).parent / "multiproc" / "trl_worker.py"


@pytest.mark.multiprocess
def test_sft_ddp_matches_local_perturbation_replay(tmp_path):
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    launcher = [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
    cmd = launcher + [
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(find_free_port()),
        str(WORKER), "--out", str(tmp_path), "--grad-accum", "2",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")

    result = torch.load(tmp_path / "result.pt")
    world = result["world"]
    assert world == 2
    recorded = [torch.load(tmp_path / f"batches_rank{r}.pt") for r in range(world)]
    assert len(recorded[0]) == 6 and len(recorded[1]) == 6
    assert not torch.equal(recorded[0][0][0]["input_ids"], recorded[1][0][0]["input_ids"]), "ranks must differ"
    # num_items_in_batch counts the label tokens of the whole step on every rank; TRL then multiplies the loss
    # by the world size because DDP averages the gradients
    factor = world if result["tokens_across_devices"] else 1
    batches = [[{**inputs, "num_items": n} for inputs, n in rank] for rank in recorded]
    loss = lambda m, names, ps, b: sft_loss(m, names, ps, b, b["num_items"]) * factor

    def replay(rho):
        return replay_sam_lm(build_model(seed=1), result["init"], batches, loss, grad_accum=2, lr=0.1, rho=rho,
                             adaptive=True)

    right = replay(0.5)
    final = {k: result["final"][k] for k in right}
    assert max_difference(final, right) < 1e-6
    assert max_difference(final, replay(0.0)) > 1e-4
    assert len(result["logs"]) == 3 and all(e["sam_perturbation_norm"] > 0 for e in result["logs"])
