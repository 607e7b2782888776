"""The README's trainer example runs as written, and the shipped accelerate / DeepSpeed configs load."""

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("single_thread_torch")

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "recipes" / "accelerate_configs"


def test_readme_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "SAFTTrainer(" in block]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 8
    assert (tmp_path / "saft_demo_out" / "model.safetensors").exists()
    card = (tmp_path / "saft_demo_out" / "README.md").read_text()
    assert "- saft" in card


@pytest.mark.parametrize(
    "name,distributed_type",
    [
        ("single_gpu.yaml", "NO"),
        ("multi_gpu_ddp.yaml", "MULTI_GPU"),
        ("deepspeed_zero2.yaml", "DEEPSPEED"),
        ("deepspeed_zero3.yaml", "DEEPSPEED"),
        ("fsdp2.yaml", "FSDP"),
    ],
)
def test_accelerate_configs_load(name, distributed_type):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / name))
    assert str(config.distributed_type).endswith(distributed_type)
    if name == "deepspeed_zero3.yaml":
        ds_file = ROOT / config.deepspeed_config["deepspeed_config_file"]
        ds = json.loads(ds_file.read_text())
        assert ds["zero_optimization"]["stage"] == 3 and ds["zero_allow_untested_optimizer"]


@pytest.mark.parametrize("recipe", ["accelerate_configs", "clip_vision/accelerate", "flan_t5_glue/accelerate"])
def test_fsdp2_configs_select_fsdp2(recipe):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "recipes" / recipe / "fsdp2.yaml"))
    assert str(config.distributed_type).endswith("FSDP") and config.fsdp_config["fsdp_version"] == 2
