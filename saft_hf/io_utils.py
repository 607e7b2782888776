"""Safe output writing: nothing half-written is ever left under the final name, an output never
replaces what it must not (an input, or something that appeared while we were writing), and the
temporary files of killed runs are cleaned up.

Public API (used by every command that writes results):

- `check_output(path, inputs=(), overwrite=False, directory=True) -> Path`: all the up-front
  checks, creating nothing - call it before expensive work so a bad output fails in a second.
- `check_output_directory(path, what, inputs) -> Path`: the same for a directory that is filled
  in file by file (may exist, must not be a file).
- `atomic_directory(path, overwrite=False, inputs=()) -> Iterator[Path]`: a temporary directory
  beside `path`, renamed to `path` on success (see its docstring for the guarantees).
- `atomic_path(path, inputs=()) -> Iterator[Path]`: the same for one file (always replaces).
- `write_text_atomic`, `write_json_atomic`: one-call versions of `atomic_path`.
- `OutputError` (an `OSError`; `OutputExistsError` is also a `FileExistsError`): every refusal,
  with a one-line message naming the path and the fix.
- `os_error_message(exc, output=None) -> str`: a one-line message for any `OSError` (disk full,
  read-only, too many open files, ...), for CLI error handlers.
- `leftovers(path) -> list[Path]`: temporary entries of interrupted runs beside `path`.

Temporary names are `.NAME.<pid>-<8 hex>.tmp` (and `.old` for a replaced output), so a later run
can tell whose they are; `.NAME.lock` serialises writers of one output directory.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no locking (the no-replace rename still protects outputs)
    fcntl = None

logger = logging.getLogger(__name__)

# Errors that mean "the output location cannot take the data" (as opposed to a bad input).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class OutputError(OSError):
    """An output that cannot or must not be written; the message names it and the fix."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists (or appeared while writing) and may not be replaced."""


# ----------------------------------------------------------------------------------------------
# messages


def _free_space(path: Path) -> str:
    for p in (path, *path.parents):
        try:
            return f"{shutil.disk_usage(p).free / 1e6:.1f} MB free"
        except OSError:
            continue
    return "free space unknown"


def os_error_message(exc: OSError, output: str | os.PathLike | None = None) -> str:
    """One line saying what went wrong with which path, and what to do about it."""
    if isinstance(exc, OutputError) or (exc.errno is None and exc.filename is None and len(exc.args) == 1):
        return " ".join(str(exc).split())  # an OSError raised with a message of ours (e.g. ModelPathError)
    name = exc.filename if exc.filename is not None else output
    where = f" {name}" if name is not None else ""
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        place = Path(os.path.abspath(output if output is not None else name or "."))
        kind = "disk quota exceeded" if code == errno.EDQUOT else "no space left on device"
        return (f"{kind} while writing{where} ({_free_space(place)} on the device of {place}); "
                "free some space or choose an output on another filesystem")
    if code == errno.EROFS:
        return f"cannot write{where}: read-only filesystem; choose an output on a writable filesystem"
    if code in (errno.EMFILE, errno.ENFILE):
        return (f"too many open files (opening{where}); raise the limit, e.g. `ulimit -n 4096` in the shell, "
                "and run again")
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied:{where}; check its permissions or choose another location"
    if code == errno.EISDIR:
        return f"{name} is a directory, expected a file"
    if code == errno.ENOTDIR:
        return f"a component of{where} is a file, not a directory; check the path"
    if code == errno.ENOENT:
        return f"{name} does not exist; check the path"
    if code == errno.ENAMETOOLONG:
        return f"file name too long:{where}; use a shorter name"
    if code == errno.EIO:
        return f"input/output error on{where}: the disk or network filesystem failed; check it and run again"
    return f"{exc.strerror or exc}:{where}" if exc.strerror else f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------------------------
# checks


def _abs(path) -> Path:
    # absolute and normalised, but symlinks kept: the output is the link itself, not its target
    return Path(os.path.abspath(os.fspath(path)))


def _identity(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _input_locations(inputs: Iterable) -> list[tuple[str, Path]]:
    """(as given, resolved path) for each input, plus the targets of symlinks directly inside an
    input directory (Hugging Face cache snapshots are links into a `blobs` directory)."""
    out = []
    for given in inputs:
        if given is None or not isinstance(given, (str, os.PathLike)):
            continue
        p = _abs(given)
        if not os.path.lexists(p):  # nothing there to destroy (e.g. a Hub model id)
            continue
        out.append((str(given), Path(os.path.realpath(p))))
        if p.is_dir():
            try:
                entries = list(os.scandir(p))
            except OSError:
                entries = []
            for e in entries:
                if e.is_symlink() and os.path.isfile(e.path):
                    out.append((str(given), Path(os.path.realpath(e.path))))
    return out


def _overlap(output: Path, inputs: Iterable) -> str | None:
    """How `output` overlaps an input ('is', 'contains', 'lies inside'), as a message, or None."""
    real = Path(os.path.realpath(output))
    out_chain = [(q, _identity(q)) for q in (real, *real.parents)]
    out_id = _identity(real)
    for given, inp in _input_locations(inputs):
        inp_id = _identity(inp)
        relation = None
        if real == inp or (out_id is not None and out_id == inp_id):
            relation = "is"
        elif real in inp.parents or (out_id is not None and out_id in {_identity(q) for q in inp.parents}):
            relation = "contains"
        elif inp in real.parents or (inp_id is not None and inp_id in {i for q, i in out_chain[1:]}):
            relation = "lies inside"
        if relation:
            shown = given if _abs(given) == inp else f"{given} (= {inp})"
            target = "" if real == output else f" (it resolves to {real})"
            return (f"output {output}{target} {relation} the input {shown}; writing there would destroy or modify "
                    "the input, with or without --overwrite. Choose an output outside every input")
    return None


def _first_existing(path: Path) -> Path:
    for q in (path, *path.parents):
        if os.path.lexists(q):
            return q
    return Path(path.anchor or "/")


def check_output(path, inputs: Iterable = (), overwrite: bool = False, directory: bool = True) -> Path:
    """Refuse an output that cannot or must not be written, creating nothing; return it absolute.

    Refused: an output that is, contains or lies inside one of `inputs` (symlinks resolved, with
    or without `overwrite`); an existing output without `overwrite` (a dangling symlink included);
    an output whose parent is a file; an output under a read-only or unwritable directory; for a
    file output (`directory=False`), an existing directory.
    """
    p = _abs(path)
    if p == p.parent or not p.name:
        raise OutputError(f"output {path} is a filesystem root; choose a directory below it")
    overlap = _overlap(p, inputs)
    if overlap:
        raise OutputError(overlap)
    if os.path.lexists(p):
        if os.path.islink(p) and not os.path.exists(p) and not overwrite:
            raise OutputError(f"output {p} is a symbolic link to {os.readlink(p)}, which does not exist; remove the "
                              "link or choose another output")
        if not directory and p.is_dir():
            raise OutputError(f"output {p} is a directory; give a file name")
        if not overwrite:
            raise OutputExistsError(f"output {p} already exists; choose another output or pass --overwrite to "
                                    "replace it")
    anc = _first_existing(p.parent)
    if not anc.is_dir():
        what = "a broken symbolic link" if os.path.islink(anc) and not anc.exists() else "a file, not a directory"
        raise OutputError(f"cannot create output {p}: {anc} is {what}; choose another output")
    if not os.access(anc, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(anc).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "is on a read-only filesystem" if read_only else "is not writable (permission denied)"
        raise OutputError(f"cannot write output {p}: {anc} {why}; choose a writable location")
    return p


def check_output_directory(path, what: str = "output", inputs: Iterable = ()) -> Path:
    """For a directory a command fills in (it may exist; files in it are replaced one by one):
    `check_output(path, inputs, overwrite=True)`, and refuse an existing non-directory now, before
    the work, not when the first file is written. Returns `path` as given, as a Path."""
    p = check_output(path, inputs=inputs, overwrite=True)
    if os.path.lexists(p) and not p.is_dir():
        raise OutputError(f"{what} {path} is a file, not a directory; choose a directory (it is created if missing)")
    return Path(path)


# ----------------------------------------------------------------------------------------------
# temporary names, stale leftovers, locking


def _temp_name(p: Path, suffix: str) -> Path:
    return p.parent / f".{p.name}.{os.getpid()}-{secrets.token_hex(4)}.{suffix}"


def _leftover_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.(\d+)-[0-9a-f]{{8}}\.(tmp|old)")


def _legacy_pattern(name: str) -> re.Pattern:
    # names written by versions before 0.2 (mkdtemp/mkstemp), which carry no owner
    return re.compile(rf"\.{re.escape(name)}\.(?:[a-z0-9_]{{8}}\.tmp|old)")


def leftovers(path) -> list[Path]:
    """Temporary entries beside `path` left by interrupted runs writing `path` (ours or older)."""
    p = _abs(path)
    ours, legacy = _leftover_pattern(p.name), _legacy_pattern(p.name)
    try:
        names = os.listdir(p.parent)
    except OSError:
        return []
    return sorted(p.parent / n for n in names if ours.fullmatch(n) or legacy.fullmatch(n))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed but not yet reaped process (zombie) is gone too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove(path: Path) -> None:
    """Delete a temporary entry (a tree, a file or a link - never what a link points to). Read-only
    directories inside it (an old output made read-only) are made writable first; what still
    cannot be removed is reported."""
    if os.path.isdir(path) and not os.path.islink(path):
        def retry_writable(func, name, _exc_info):
            parent = os.path.dirname(name)
            try:
                os.chmod(parent, os.stat(parent).st_mode | 0o700)
                if os.path.isdir(name) and not os.path.islink(name):
                    os.chmod(name, os.stat(name).st_mode | 0o700)
                    shutil.rmtree(name, ignore_errors=True)
                else:
                    func(name)
            except OSError:
                pass

        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=lambda f, n, e: retry_writable(f, n, None))
        else:
            shutil.rmtree(path, onerror=retry_writable)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if os.path.lexists(path):
        logger.warning("could not remove the temporary %s; delete it by hand", path)


def _clean_stale(p: Path) -> None:
    """Remove temporaries of dead runs beside `p` (called with p's lock held, so no live writer
    that takes the lock owns them); report what cannot be proven stale."""
    ours = _leftover_pattern(p.name)
    for entry in leftovers(p):
        m = ours.fullmatch(entry.name)
        if m and not _pid_alive(int(m.group(1))):
            _remove(entry)
            if not os.path.lexists(entry):
                logger.warning("removed %s, left behind by an interrupted run (process %s)", entry, m.group(1))
                continue
        if m:
            logger.warning("found %s, owned by process %s, which is still running but is not writing %s; delete it "
                           "if that process does not need it", entry, m.group(1), p)
        else:
            logger.warning("found %s, probably left behind by an interrupted run of an older version; delete it "
                           "to free the space", entry)


@contextlib.contextmanager
def _output_lock(p: Path, wait: bool) -> Iterator[None]:
    """Hold `.NAME.lock` beside `p` (flock). Without `wait`, fail at once if another run holds it.
    The lock file is removed on release; a waiter that locked the removed file retries."""
    if fcntl is None:
        yield
        return
    lock = p.parent / f".{p.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                who = f"another run (process {holder})" if holder.isdigit() else "another run"
                if not wait:
                    raise OutputError(f"{who} is writing {p} right now (lock file {lock}); wait for it to finish "
                                      "or choose another output") from None
                logger.warning("%s is writing %s; waiting for it to finish", who, p)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                # a filesystem without locks (some network mounts): the no-replace rename still
                # protects the output; concurrent --overwrite runs are then not serialised
                logger.debug("cannot lock %s (%s); continuing without the lock", lock, exc)
                break
            st, now = os.fstat(fd), _identity(lock)
            if now == (st.st_dev, st.st_ino):
                break
            os.close(fd)  # the previous holder removed the file we locked: lock the current one
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)  # releases the lock


# ----------------------------------------------------------------------------------------------
# renames

_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False if this system or filesystem does not support it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _rename_no_replace(src: Path, dst: Path) -> None:
    """Rename directory `src` to `dst`, failing with FileExistsError if anything is at `dst`."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise
    # Fallback: claim the name with mkdir (atomic), then rename onto that empty directory of ours
    # (a plain rename would silently replace an empty directory someone else made).
    os.mkdir(dst)
    try:
        os.rename(src, dst)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.rmdir(dst)
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise


def _replace(src: Path, dst: Path) -> None:
    """Put directory `src` at `dst`, replacing whatever is there (dir, file or symlink - a link is
    replaced, never followed); the old entry is removed afterwards."""
    if _renameat2(src, dst, _RENAME_EXCHANGE):  # atomic swap: dst is never missing
        _remove(src)
        return
    old = _temp_name(dst, "old")
    os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(old, dst)
        raise
    _remove(old)


def _commit_directory(tmp: Path, p: Path, overwrite: bool) -> None:
    if overwrite and os.path.lexists(p):
        _replace(tmp, p)
        return
    try:
        _rename_no_replace(tmp, p)
    except FileExistsError:
        if overwrite:
            _replace(tmp, p)
            return
        raise OutputExistsError(
            f"output {p} was created by someone else while this run was writing; it was left untouched and "
            "nothing was written. Choose another output, or pass --overwrite to replace it") from None


# ----------------------------------------------------------------------------------------------
# atomic writers


def _make_parents(p: Path) -> list[Path]:
    """Create the missing parents of `p`; return the ones created (deepest last)."""
    missing = []
    for q in p.parents:
        if os.path.lexists(q):
            break
        missing.append(q)
    for q in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(q)
    return list(reversed(missing))


def _remove_created(created: list[Path]) -> None:
    for q in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(q)  # only if still empty


_ERRNO_IN_TEXT = re.compile(r"(?:os error|Errno|code:)\s*(\d+)")


def write_errno(exc: BaseException) -> int | None:
    """The 'disk full / read-only' errno of `exc`, also when a library wraps it in its own type
    (safetensors: `SafetensorError: ... Os { code: 28 ... }`); None for anything else."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in _WRITE_ERRNOS else None
    text = str(exc)
    for match in _ERRNO_IN_TEXT.finditer(text):
        if int(match.group(1)) in _WRITE_ERRNOS:
            return int(match.group(1))
    if "No space left on device" in text:
        return errno.ENOSPC
    return None


@contextlib.contextmanager
def _output_errors(p: Path) -> Iterator[None]:
    """Turn 'disk full / read-only / ...' errors raised while writing `p` into OutputError."""
    try:
        yield
    except OutputError:
        raise
    except Exception as exc:
        code = write_errno(exc)
        if code is not None:
            err = exc if isinstance(exc, OSError) else OSError(code, os.strerror(code))
            raise OutputError(os_error_message(err, output=p)) from exc
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False, inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a new empty temporary directory beside `path`; on success move it to `path`.

    - On an exception the temporary directory (and any parent directory created for it) is
      deleted and `path` is left as it was.
    - `path` may not be, contain or lie inside any of `inputs` (symlinks resolved), whatever
      `overwrite` says; see `check_output` for the other refusals (all raise `OutputError`).
    - Without `overwrite` nothing is ever replaced: the final rename fails if anything appeared
      at `path` meanwhile (`OutputExistsError`), and a concurrent writer of the same `path`
      makes this one fail at once. With `overwrite`, writers of one `path` take turns (a lock
      file `.NAME.lock` beside it), and the existing entry is swapped out only when the new one
      is complete.
    - Temporaries of killed runs writing `path` are removed (or reported) before writing.
    - The directory gets the normal permissions of the process umask.
    """
    p = check_output(path, inputs, overwrite=overwrite, directory=True)
    created: list[Path] = []
    try:
        with _output_errors(p):
            created = _make_parents(p)
            with _output_lock(p, wait=overwrite):
                _clean_stale(p)
                if os.path.lexists(p) and not overwrite:  # re-check under the lock
                    check_output(p, inputs, overwrite=False)
                while True:
                    tmp = _temp_name(p, "tmp")
                    try:
                        os.mkdir(tmp)  # mode 0o777 & ~umask
                        break
                    except FileExistsError:
                        continue
                try:
                    yield tmp
                    _commit_directory(tmp, p, overwrite)
                finally:
                    if os.path.lexists(tmp):
                        _remove(tmp)
    except BaseException:
        _remove_created(created)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success rename it onto `path`.

    On an exception the temporary file is removed and `path` is left as it was. `path` may not
    be, contain or lie inside one of `inputs`. The file gets the normal permissions of the
    process umask (not mkstemp's 0600).
    """
    p = check_output(path, inputs, overwrite=True, directory=False)
    created: list[Path] = []
    try:
        with _output_errors(p):
            created = _make_parents(p)
            while True:
                tmp = _temp_name(p, "tmp")
                try:
                    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 & ~umask
                    break
                except FileExistsError:
                    continue
            try:
                yield tmp
                os.replace(tmp, p)
            finally:
                if os.path.lexists(tmp):
                    _remove(tmp)
    except BaseException:
        _remove_created(created)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars and paths show up in reports; store them as plain JSON values.
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in JSON")
