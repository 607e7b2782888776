"""LoRA through peft for SAFT (saft_hf.finetuning.lora) on a tiny T5: config, trainable set, saving,
SAFT perturbing only the adapters, and the adapter's task vector as saft_hf.merging reads it."""
import json

import pytest
import torch

from saft_hf.finetuning.lora import LoraArguments, apply_lora, build_lora_config, is_peft_model, save_lora_adapter
from saft_hf.testing.glue import tiny_t5, tiny_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    # 2 shared cores: avoid thread oversubscription (tiny models are faster on one thread anyway)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_arguments_and_config():
    assert not LoraArguments().enabled
    args = LoraArguments(lora_r=4, lora_alpha=8, lora_target_modules=["q", "k", "v", "o"])
    cfg = build_lora_config(args)
    assert cfg.r == 4 and cfg.lora_alpha == 8 and set(cfg.target_modules) == {"q", "k", "v", "o"}
    assert build_lora_config(LoraArguments(lora_r=2, lora_target_modules=["all-linear"])).target_modules == "all-linear"
    with pytest.raises(ValueError, match="lora_r must be >= 0"):
        LoraArguments(lora_r=-1)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraArguments(lora_r=2, lora_dropout=1.0)


def test_only_adapters_train_and_unknown_targets_fail(tok):
    model = apply_lora(tiny_t5(tok, d_model=16), LoraArguments(lora_r=2, lora_target_modules=["q", "v"]))
    assert is_peft_model(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".q.lora_A" in n for n in trainable) and any(".v.lora_B" in n for n in trainable)
    with pytest.raises(ValueError, match="not found in T5ForConditionalGeneration"):
        apply_lora(tiny_t5(tok, d_model=16), LoraArguments(lora_r=2, lora_target_modules=["query"]))


def test_saft_perturbs_and_updates_only_adapters(tok, tmp_path):
    """SAFTSeq2SeqTrainer + ASAM on a peft model: base weights stay bit-identical, adapters move."""
    from transformers import DataCollatorForSeq2Seq

    from saft_hf import SAFTSeq2SeqTrainer, SAFTSeq2SeqTrainingArguments
    from saft_hf.glue.data import tokenize_split
    from saft_hf.testing.glue import tiny_glue_dataset_dict
    from saft_hf.tasks.glue import get_task

    model = apply_lora(tiny_t5(tok, d_model=16), LoraArguments(lora_r=2, lora_dropout=0.0))
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = tokenize_split(get_task("sst2"), tiny_glue_dataset_dict("sst2", 16, 4)["train"], tok).remove_columns(["reference"])
    seen_perturbed = []

    args = SAFTSeq2SeqTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
        # sam_eta > 0: with eta = 0 ASAM cannot perturb LoRA's zero-initialised B (T_w = |w| = 0) at step 1
        sam_rho=0.5, sam_variant="asam", sam_eta=0.01, report_to="none", save_strategy="no", use_cpu=True, logging_steps=1,
    )
    trainer = SAFTSeq2SeqTrainer(model=model, args=args, train_dataset=data,
                                 data_collator=DataCollatorForSeq2Seq(tok, model=model), processing_class=tok)
    # Record which parameters differ from their saved values during the second (perturbed) pass.
    original_compute_loss = trainer.compute_loss
    calls = {"n": 0}

    snapshot = {}

    def spy(*a, **k):
        calls["n"] += 1
        if calls["n"] % 2 == 1:  # first pass of a SAM step: weights w
            snapshot.update({n: p.detach().clone() for n, p in model.named_parameters()})
        else:  # second pass: weights w + e(w)
            moved = [n for n, p in model.named_parameters() if not torch.equal(p, snapshot[n])]
            seen_perturbed.append(([n for n in moved if n in lora_before], [n for n in moved if n in base_before]))
        return original_compute_loss(*a, **k)

    trainer.compute_loss = spy
    trainer.train()
    assert calls["n"] == 6  # two passes per step: SAM is really on
    assert seen_perturbed and all(base == [] for _, base in seen_perturbed)
    assert all(changed for changed, _ in seen_perturbed), "the perturbation must move the adapters"
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if n in lora_before)


def test_save_adapter_keeps_other_files_and_merges_as_task_vector(tok, tmp_path):
    from saft_hf.merging import merge_models, open_source

    base = tiny_t5(tok, d_model=16)
    base.save_pretrained(str(tmp_path / "base"))
    tok.save_pretrained(str(tmp_path / "base"))
    from transformers import AutoModelForSeq2SeqLM

    peft_model = apply_lora(AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "base")), LoraArguments(lora_r=2))
    with torch.no_grad():  # a non-zero B so the adapter has a non-zero delta
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "trainer_state.json").write_text("{}")
    save_lora_adapter(peft_model, out, tok)
    assert (out / "trainer_state.json").exists()
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "base")
    assert not [p for p in out.iterdir() if p.name.startswith(".adapter.")]

    # task arithmetic with scaling 1 of a single adapter == peft's own merge_and_unload
    merge_models({"pretrained": str(tmp_path / "base"), "models": [str(out)], "method": "task_arithmetic",
                  "params": {"scaling": 1.0}}, tmp_path / "merged", progress=False)
    expected = peft_model.merge_and_unload().state_dict()
    merged = open_source(str(tmp_path / "merged"))
    for key in merged.keys():
        assert torch.allclose(merged.get(key), expected[key], atol=1e-6), key
    with pytest.raises(TypeError, match="peft model"):
        save_lora_adapter(base, tmp_path / "x")
