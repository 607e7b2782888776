"""GLUE text-to-text definitions, data loading/validation, scoring and argument parsing (fast, offline)."""
import json

import pytest
import torch

from saft_hf.glue.data import MalformedGlueData, load_glue_split, resolve_split, tokenize_split, validate_rows
from saft_hf.glue.finetune import parse_glue_arguments, read_finetuned_score, yaml_to_argv
from saft_hf.glue.predict import load_state_dict_into, score_generations, tied_parameter_groups
from saft_hf.testing.glue import tiny_glue_dataset_dict, tiny_t5, tiny_tokenizer
from saft_hf.tasks.glue import (
    GLUE8_TASKS,
    GLUE_TASKS,
    PAPER_TASKS,
    UNPARSEABLE,
    format_input,
    format_target,
    get_task,
    parse_prediction,
    score_metric,
    stsb_to_text,
)


def test_task_table_is_complete_and_unambiguous():
    assert set(GLUE_TASKS) == set(GLUE8_TASKS) and set(PAPER_TASKS) <= set(GLUE_TASKS)
    for task in GLUE_TASKS.values():
        if task.is_regression:
            continue
        normalized = {w.lower().replace(" ", "") for w in task.label_words}
        assert len(normalized) == task.num_labels == len(task.label_names), task.name
        for col in task.text_columns:
            assert "{" + col + "}" in task.template, (task.name, col)
    assert get_task("MNLI").validation_split == "validation_matched"
    assert resolve_split(get_task("mnli"), "validation") == "validation_matched"
    assert resolve_split(get_task("cola"), "train") == "train"
    with pytest.raises(KeyError, match="unknown GLUE task"):
        get_task("squad")


def test_formatting_hand_cases():
    cola, rte, mnli = get_task("cola"), get_task("rte"), get_task("mnli")
    assert format_input(cola, {"sentence": "The dog runs.", "label": 1, "idx": 0}).endswith("Sentence: The dog runs.")
    assert format_target(cola, 0) == "unacceptable" and format_target(cola, 1) == "acceptable"
    assert format_target(rte, 0) == "yes"  # GLUE RTE: 0 = entailment
    assert [format_target(mnli, i) for i in range(3)] == ["yes", "maybe", "no"]
    text = format_input(get_task("mrpc"), {"sentence1": "A b.", "sentence2": "C d."})
    assert "Sentence 1: A b.\nSentence 2: C d." in text


@pytest.mark.parametrize(
    "score,text",
    [(0.0, "0.0"), (0.09, "0.0"), (0.1, "0.2"), (2.49, "2.4"), (2.5, "2.6"), (3.7, "3.8"), (4.95, "5.0"), (5.0, "5.0"),
     (-0.3, "0.0"), (5.2, "5.0")],
)
def test_stsb_targets_round_to_point_two(score, text):
    # nearest multiple of 0.2, exact halves (0.1, 2.5) round up, clipped to [0, 5]
    assert stsb_to_text(score) == text
    assert format_target(get_task("stsb"), score) == text


def test_parse_prediction_exact_match_and_unparseable():
    cola, stsb = get_task("cola"), get_task("stsb")
    assert parse_prediction(cola, "acceptable") == (1, True)
    assert parse_prediction(cola, " Unacceptable ") == (0, True)
    assert parse_prediction(cola, "acceptable acceptable") == (UNPARSEABLE, False)
    assert parse_prediction(cola, "") == (UNPARSEABLE, False)
    assert parse_prediction(stsb, "3. 4") == (3.4, True)  # WordPiece-style detokenization
    assert parse_prediction(stsb, "7.0") == (5.0, True)  # clipped to the scale
    assert parse_prediction(stsb, "similar") == (0.0, False)


def test_score_generations_counts_unparseable_as_wrong():
    mrpc = get_task("mrpc")
    m = score_generations(mrpc, ["yes", "no", "maybe", "yes"], [1, 0, 1, 0])
    # predictions [1, 0, -1, 1]: accuracy 2/4; F1: TP=1, FP=1, FN=1 -> 0.5
    assert m["accuracy"] == pytest.approx(0.5) and m["f1"] == pytest.approx(0.5)
    assert m["unparseable_rate"] == pytest.approx(0.25) and m["num_examples"] == 4
    s = score_generations(get_task("stsb"), ["1.0", "2.0", "x", "4.0"], [1.0, 2.0, 3.0, 4.0])
    assert set(s) >= {"spearman", "pearson"} and s["unparseable_rate"] == 0.25
    assert score_metric(get_task("cola"), "glue") == "matthews_correlation"
    assert score_metric(get_task("cola")) == "accuracy" and score_metric(get_task("stsb")) == "spearman"
    with pytest.raises(ValueError, match="score kind"):
        score_metric(mrpc, "best")


def _save(tmp_path, task, **kwargs):
    path = tmp_path / task
    tiny_glue_dataset_dict(task, **kwargs).save_to_disk(str(path))
    return path


def test_load_local_formats(tmp_path):
    mnli_dir = _save(tmp_path, "mnli", train_size=6, validation_size=3)
    val = load_glue_split(get_task("mnli"), "validation", mnli_dir)
    assert len(val) == 3 and set(val.column_names) >= {"premise", "hypothesis", "label"}
    sub = load_glue_split(get_task("mnli"), "train", mnli_dir, max_samples=4)
    assert len(sub) == 4 and sub["idx"] == load_glue_split(get_task("mnli"), "train", mnli_dir, max_samples=4)["idx"]
    # a single saved Dataset, and split files in csv / jsonl / parquet
    ds = tiny_glue_dataset_dict("sst2", train_size=5, validation_size=2)
    ds["train"].save_to_disk(str(tmp_path / "single"))
    assert len(load_glue_split(get_task("sst2"), "train", tmp_path / "single")) == 5
    for ext, writer in (("csv", "to_csv"), ("jsonl", "to_json"), ("parquet", "to_parquet")):
        folder = tmp_path / f"files_{ext}"
        folder.mkdir()
        getattr(ds["validation"], writer)(str(folder / f"validation.{ext}"))
        loaded = load_glue_split(get_task("sst2"), "validation", folder)
        assert loaded["label"] == ds["validation"]["label"], ext
    with pytest.raises(FileNotFoundError, match="no data for split 'train'"):
        load_glue_split(get_task("sst2"), "train", tmp_path / "files_csv")


@pytest.mark.parametrize(
    "task,row,column,message",
    [
        ("cola", {"label": 1}, "sentence", "missing column"),
        ("cola", {"sentence": "   ", "label": 1}, "sentence", "empty"),
        ("mrpc", {"sentence1": "a", "sentence2": None, "label": 1}, "sentence2", "empty or non-text"),
        ("sst2", {"sentence": "fine", "label": 2}, "label", "not one of \\[0, 1\\]"),
        ("rte", {"sentence1": "a", "sentence2": "b", "label": -1}, "label", "hidden labels"),
        ("stsb", {"sentence1": "a", "sentence2": "b", "label": 5.5}, "label", "outside"),
    ],
)
def test_malformed_rows_are_rejected_with_task_row_and_column(task, row, column, message):
    import datasets

    good = {c: "fine text" for c in get_task(task).text_columns}
    good["label"] = 1
    rows = [good, good, {**{k: v for k, v in good.items() if k in row or k not in ("label", column)}, **row}]
    if message == "missing column":
        rows = [row, row]
    dataset = datasets.Dataset.from_list(rows)
    with pytest.raises(MalformedGlueData) as err:
        validate_rows(get_task(task), dataset, "train")
    text = str(err.value)
    assert f"GLUE task {task!r}" in text, text
    assert f"'{column}'" in text or f"['{column}']" in text, text
    assert __import__("re").search(message, text), text
    if message != "missing column":
        assert "row 2" in text


def test_malformed_local_csv_is_rejected_on_load(tmp_path):
    (tmp_path / "train.csv").write_text("sentence,label\ngood movie,1\nbad movie,7\n")
    with pytest.raises(MalformedGlueData, match="row 1, column 'label'"):
        load_glue_split(get_task("sst2"), "train", tmp_path)


def test_tokenize_split_builds_text_to_text_features():
    tok = tiny_tokenizer()
    task = get_task("stsb")
    ds = tiny_glue_dataset_dict("stsb", train_size=4, validation_size=2)["train"]
    enc = tokenize_split(task, ds, tok)
    assert set(enc.column_names) == {"input_ids", "attention_mask", "labels", "reference"}
    first = ds[0]
    assert tok.decode(enc[0]["labels"], skip_special_tokens=True).replace(" ", "") == stsb_to_text(first["label"])
    assert enc[0]["reference"] == pytest.approx(first["label"])
    assert "labels" not in tokenize_split(task, ds, tok, with_targets=False).column_names


def test_tied_state_dict_loading():
    tok = tiny_tokenizer()
    model = tiny_t5(tok, d_model=16)
    groups = tied_parameter_groups(model)
    assert any({"shared.weight", "encoder.embed_tokens.weight"} <= set(g) for g in groups)
    state = {k: v.clone() + 1.0 for k, v in model.state_dict().items()}
    # merged once under one name: the aliases follow
    once = {k: v for k, v in state.items() if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")}
    load_state_dict_into(model, once)
    assert torch.equal(model.encoder.embed_tokens.weight, state["shared.weight"])
    # aliases that disagree are an error, not a silent pick
    bad = dict(state)
    bad["encoder.embed_tokens.weight"] = bad["shared.weight"] + 1
    with pytest.raises(ValueError, match="tied tensors"):
        load_state_dict_into(model, bad)
    with pytest.raises(KeyError, match="lacks"):
        load_state_dict_into(model, {"shared.weight": state["shared.weight"]})
    with pytest.raises(KeyError, match="does not"):
        load_state_dict_into(model, {**state, "extra.weight": torch.zeros(1)})


def test_yaml_config_with_command_line_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model_name_or_path: some/model\nlearning_rate: 1.0e-5\nmax_steps: 8000\nsam_rho: 0.5\n"
        "lora_target_modules: [q, k, v]\nreport_to: none\nuse_cpu: true\n"
    )
    model, data, lora, train = parse_glue_arguments(
        ["--config", str(cfg), "--task", "sst2", "--output_dir", str(tmp_path / "o"), "--max_steps", "3", "--lora_r", "4"]
    )
    assert model.model_name_or_path == "some/model" and data.task == "sst2"
    assert train.learning_rate == 1e-5 and train.max_steps == 3 and train.sam_rho == 0.5
    assert lora.lora_r == 4 and lora.lora_target_modules == ["q", "k", "v"]
    assert yaml_to_argv({"a": True, "b": [1, 2], "c": None}) == ["--a", "true", "--b", "1", "2"]
    with pytest.raises(ValueError, match="--task is required"):
        parse_glue_arguments(["--output_dir", str(tmp_path / "o"), "--use_cpu", "true"])


def test_read_finetuned_score(tmp_path):
    (tmp_path / "glue_scores.json").write_text(json.dumps({"task": "cola", "score": 0.75}))
    assert read_finetuned_score(tmp_path, "cola") == 0.75
    with pytest.raises(ValueError, match="not 'rte'"):
        read_finetuned_score(tmp_path, "rte")
    with pytest.raises(FileNotFoundError, match="glue_scores.json"):
        read_finetuned_score(tmp_path / "missing")


def test_hub_is_the_default_source(monkeypatch):
    """Without a local path the task's split comes from nyu-mll/glue with config = task (MNLI: validation_matched)."""
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return tiny_glue_dataset_dict("mnli", train_size=3, validation_size=3)["validation_matched"]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(load_glue_split(get_task("mnli"), "validation")) == 3
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]


def test_evaluator_runs_every_glue_task(tmp_path):
    """All 8 tasks through the generation-based evaluator on a random tiny T5: every metric is reported."""
    from saft_hf.glue.predict import make_glue_evaluator
    from saft_hf.testing.glue import write_tiny_glue

    tok = tiny_tokenizer()
    paths = write_tiny_glue(tmp_path, GLUE8_TASKS, train_size=2, validation_size=6)
    evaluator = make_glue_evaluator(GLUE8_TASKS, tiny_t5(tok, d_model=16), tok, data_paths=paths, score="glue",
                                    max_new_tokens=3)
    results = evaluator.evaluate()
    assert set(results) == set(GLUE8_TASKS)
    for name, metrics in results.items():
        task = get_task(name)
        assert set(task.glue_metrics) <= set(metrics), name
        assert metrics["score_metric"] == task.glue_metrics[0] and metrics["num_examples"] == 6
        assert -1.0 <= metrics["score"] <= 1.0
    assert evaluator() == {t: results[t]["score"] for t in GLUE8_TASKS}


def test_evaluate_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    from saft_hf.cli import main

    tok = tiny_tokenizer()
    tiny_t5(tok, d_model=16).save_pretrained(str(tmp_path / "m"))
    tok.save_pretrained(str(tmp_path / "m"))
    code = main(["evaluate", "glue", "--model", str(tmp_path / "m"), "--tasks", "rte", "--finetuned_root",
                 str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o")])
    assert code == 1
    err = capsys.readouterr().err
    assert "saft-hf evaluate glue: error" in err and "glue_scores.json" in err
    assert not (tmp_path / "o").exists()


def test_export_pretrained_resaves_the_loaded_model(tmp_path):
    from saft_hf.glue.search import export_pretrained
    from saft_hf.merging import open_source

    tok = tiny_tokenizer()
    model = tiny_t5(tok, d_model=16)
    model.save_pretrained(str(tmp_path / "src"))
    tok.save_pretrained(str(tmp_path / "src"))
    out = export_pretrained(tmp_path / "src", tmp_path / "exported")
    src, exported = open_source(str(tmp_path / "src")), open_source(out)
    assert sorted(exported.keys()) == sorted(src.keys())
    assert all(torch.equal(src.get(k), exported.get(k)) for k in src.keys())
    assert (tmp_path / "exported" / "tokenizer.json").exists()
    with pytest.raises(FileExistsError):
        export_pretrained(tmp_path / "src", tmp_path / "exported")
