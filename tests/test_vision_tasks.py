"""The 8 vision task definitions: class-name rules and prompt templates (no model, no data)."""
import pytest

from saft_hf.tasks.vision import PAPER_TASKS, VISION_TASKS, clean_class_name, get_vision_task


def test_the_papers_eight_tasks_with_their_class_counts():
    assert sorted(PAPER_TASKS) == sorted(VISION_TASKS)
    counts = {t: VISION_TASKS[t].num_classes for t in PAPER_TASKS}
    assert counts == {"cars": 196, "dtd": 47, "eurosat": 10, "gtsrb": 43, "mnist": 10, "resisc45": 45,
                      "sun397": 397, "svhn": 10}
    assert get_vision_task("svhn").dataset == "ufldl-stanford/svhn" and get_vision_task("svhn").config == "cropped_digits"
    assert get_vision_task("mnist").dataset == "ylecun/mnist"
    assert get_vision_task("Stanford_Cars").name == "cars"
    with pytest.raises(KeyError, match="unknown vision task 'imagenet'"):
        get_vision_task("imagenet")


def test_every_template_has_one_class_placeholder():
    for task in VISION_TASKS.values():
        assert task.templates and len(set(task.templates)) == len(task.templates), task.name
        for template in task.templates:
            assert template.count("{}") == 1, (task.name, template)
    assert len(get_vision_task("resisc45").templates) == 18
    assert get_vision_task("mnist").templates == ('a photo of the number: "{}".',)


def test_eurosat_folder_names_map_to_descriptive_names_in_any_order():
    names = get_vision_task("eurosat").class_names(["SeaLake", "AnnualCrop", "HerbaceousVegetation", "Highway"])
    assert names == ["lake or sea", "annual crop land", "brushland or shrubland", "highway or road"]
    # already-descriptive names (not in the map) are kept, cleaned
    assert get_vision_task("eurosat").class_names(["Some_New_Class"]) == ["Some New Class"]


def test_gtsrb_numeric_ids_become_sign_descriptions():
    task = get_vision_task("gtsrb")
    names = task.class_names([str(i) for i in range(43)])
    assert len(names) == 43 and names[14] == "stop" and names[0] == "red and white circle 20 kph speed limit"
    # descriptive Hub names are used as they are (no index override when names say more than ids)
    assert task.class_names(["stop sign"] * 43)[0] == "stop sign"


def test_digit_tasks_keep_digits():
    assert get_vision_task("mnist").class_names([str(i) for i in range(10)]) == [str(i) for i in range(10)]
    assert get_vision_task("svhn").class_names([str(i) for i in range(10)])[7] == "7"


@pytest.mark.parametrize("raw, clean", [
    ("baseball_diamond", "baseball diamond"), ("AnnualCrop", "annual crop"), ("/a/airplane_cabin", "airplane cabin"),
    ("/b/bakery/shop", "bakery shop"), ("AM General Hummer SUV 2000", "AM General Hummer SUV 2000"), ("3", "3"),
])
def test_clean_class_name(raw, clean):
    assert clean_class_name(raw) == clean


def test_templates_hash_changes_with_templates():
    a, b = get_vision_task("cars"), get_vision_task("sun397")
    assert a.templates_hash() != b.templates_hash() and a.templates_hash() == get_vision_task("cars").templates_hash()


def test_numeric_ids_are_mapped_by_value_not_position():
    # imagefolder-style datasets sort folder names as strings: label 2 is the folder "10"
    raw = sorted(str(i) for i in range(43))
    names = get_vision_task("gtsrb").class_names(raw)
    assert raw[2] == "10" and names[2] == "red and white circle red truck and black car no passing"
    assert names[raw.index("14")] == "stop"
