"""MergeMonitorCallback with SAFTTrainer under torchrun DDP (2 processes, gloo, CPU): only rank 0 evaluates, both
ranks log the same numbers, pick the same best checkpoint and finish with identical weights."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import find_free_port

WORKER = Path(__file__).parent / "multiproc" / "merge_monitor_worker.py"


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("merge_monitor_ddp")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = ([exe] if exe else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(find_free_port()),
        str(WORKER), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)], out


@pytest.mark.multiprocess
def test_only_rank_zero_evaluates_and_ranks_agree(launched):
    (r0, r1), out = launched
    assert r0["world"] == 2 and r0["rank"] == 0 and r1["rank"] == 1
    assert r0["calls"] == 4 and r1["calls"] == 0  # every step on rank 0, never on rank 1
    assert [e["step"] for e in r0["entries"]] == [1, 2, 3, 4]
    assert r0["entries"] == r1["entries"]  # rank 0's numbers, broadcast and logged on both ranks
    # SAFTTrainer's sharpness: none before the first training log (step 2), then the latest one
    assert [e.get("merge_monitor_sharpness_step") for e in r0["entries"]] == [None, 2, 2, 4]
    assert [r["seconds"] for r in r0["records"]] == [r["seconds"] for r in r1["records"]]
    assert all(r["seconds"] >= 0.3 for r in r0["records"])  # includes the slow evaluation
    assert r0["global_step"] == r1["global_step"] == 4
    # evaluation metrics carry the injected value on both ranks; both choose the same checkpoint
    for r in (r0, r1):
        assert all("eval_merged_mean_normalized" in e for e in r["eval_entries"])
    assert r0["best_model_checkpoint"] == r1["best_model_checkpoint"] != ""
    assert r0["best_metric"] == r1["best_metric"]
    w0, w1 = (torch.load(out / f"final_rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
