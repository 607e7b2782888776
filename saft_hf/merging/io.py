"""Lazy tensor sources (HF model dirs, safetensors / .bin checkpoints, sharded or not, in-memory
state dicts) and sinks (in-memory dict, sharded safetensors with an HF index).

A source hands out one tensor at a time, so merging T models never holds T models in memory.
"""
from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
ADAPTER_CONFIG = "adapter_config.json"


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the others (message names file/key and fix)."""


def _too_many_open_files(exc: BaseException) -> bool:
    # OSError from Python, or the same errno wrapped in a safetensors (Rust) / torch error text
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return True
    text = str(exc)
    return "Too many open files" in text or "os error 24" in text or "os error 23" in text


def read_error(path, exc: BaseException, what: str) -> CheckpointError:
    """A CheckpointError for a file that could not be read: says whether the file or the system is
    the problem (too many open files, permissions), so a healthy file is not called corrupt."""
    if _too_many_open_files(exc):
        try:
            import resource

            limit = f" (the limit is {resource.getrlimit(resource.RLIMIT_NOFILE)[0]})"
        except (ImportError, OSError, ValueError):
            limit = ""
        return CheckpointError(
            f"cannot open {path}: too many open files{limit}. The merge keeps every shard of every checkpoint "
            "open; raise the limit (e.g. `ulimit -n 4096` in the shell) and run again. The file itself is not "
            "the problem.")
    if isinstance(exc, PermissionError):
        return CheckpointError(f"cannot read {path}: permission denied; make it readable (chmod) and run again")
    if isinstance(exc, IsADirectoryError):
        return CheckpointError(f"{path} is a directory, not a {what} file")
    if isinstance(exc, OSError) and exc.errno == errno.EIO:
        return CheckpointError(f"input/output error reading {path}: the disk or network filesystem failed")
    if what == "safetensors":
        return CheckpointError(f"cannot read safetensors file {path}: {exc}. The file is corrupt or incomplete; "
                               "re-save or re-download it.")
    return CheckpointError(f"cannot read PyTorch checkpoint {path}: {exc}. The file is corrupt or not a state dict.")


class TensorSource:
    """Read-only mapping key -> tensor, loaded on demand."""

    name: str = "<memory>"
    fresh_tensors: bool = False  # True if every get() returns a new tensor the caller may modify
    directory: Path | None = None  # where config/tokenizer files live, if any

    def keys(self) -> list[str]:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self.get(key)
        return tuple(t.shape), t.dtype

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop (first dimension) of a tensor; sources that can read a slice lazily do."""
        return self.get(key)[start:stop]

    def read_into(self, key: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Fill `out` (contiguous, same shape/dtype) with the tensor or its rows."""
        out.copy_(self.get(key) if rows is None else self.get_rows(key, *rows))

    def storage_groups(self) -> list[list[str]]:
        """Groups of keys known to share storage (only in-memory sources can know this)."""
        return []

    def close(self) -> None:
        pass

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())


class DictSource(TensorSource):
    def __init__(self, state_dict: Mapping[str, torch.Tensor], name: str = "<state dict>"):
        self.state_dict = state_dict
        self.name = name
        self._keys = list(state_dict.keys())

    def keys(self) -> list[str]:
        return self._keys

    def get(self, key: str) -> torch.Tensor:
        return self.state_dict[key]

    def info(self, key):
        t = self.state_dict[key]
        return tuple(t.shape), t.dtype

    def storage_groups(self) -> list[list[str]]:
        # Tied parameters (T5 shared/embed_tokens/lm_head) are one storage under several names.
        by_storage: dict[tuple, list[str]] = {}
        for k, t in self.state_dict.items():
            if not isinstance(t, torch.Tensor) or t.numel() == 0:
                continue
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            by_storage.setdefault(ident, []).append(k)
        return [g for g in by_storage.values() if len(g) > 1]


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsSource(TensorSource):
    """One or several .safetensors files, read tensor by tensor (or row block by row block).

    Each file is validated with safetensors' `safe_open` (header, offsets), then tensors are read
    with positioned reads (`os.preadv`) into fresh buffers: unlike reading through a long-lived
    memory map, pages of the checkpoints never pile up in this process's resident memory.
    """

    fresh_tensors = True

    def __init__(self, files: list[Path], name: str, directory: Path | None = None):
        from safetensors import safe_open

        self.name = name
        self.directory = directory
        self._fds: list[int] = []
        self._entries: dict[str, tuple[int, int, int, tuple, torch.dtype]] = {}  # key -> (file, start, end, shape, dtype)
        for i, f in enumerate(files):
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError as exc:
                self.close()
                raise read_error(f, exc, "safetensors") from exc
            self._fds.append(fd)
            try:
                with safe_open(str(f), framework="pt", device="cpu") as h:  # validates the whole header
                    keys = list(h.keys())
                n = int.from_bytes(os.pread(fd, 8, 0), "little")
                header = json.loads(os.pread(fd, n, 8))
            except Exception as exc:  # safetensors raises its own error types for corrupt files
                self.close()
                raise read_error(f, exc, "safetensors") from exc
            for k in keys:
                meta = header[k]
                dtype = _ST_DTYPES.get(meta["dtype"])
                if dtype is None:
                    raise CheckpointError(f"{f}: tensor {k!r} has unsupported dtype {meta['dtype']}")
                begin, end = meta["data_offsets"]
                self._entries[k] = (i, 8 + n + begin, 8 + n + end, tuple(meta["shape"]), dtype)

    def keys(self):
        return list(self._entries)

    def info(self, key):
        _, _, _, shape, dtype = self._entries[key]
        return shape, dtype

    def _read(self, fd: int, offset: int, size: int, buf=None):
        buf = bytearray(size) if buf is None else buf
        view, done = memoryview(buf).cast("B"), 0
        while done < size:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{self.name}: unexpected end of file (truncated checkpoint?)")
            done += got
        return buf

    def get_rows(self, key, start, stop):
        i, begin, end, shape, dtype = self._entries[key]
        if not shape:
            return self.get(key)
        stop = min(stop, shape[0])
        row_bytes = (end - begin) // shape[0] if shape[0] else 0
        return self._tensor(i, begin + start * row_bytes, (stop - start) * row_bytes, (stop - start, *shape[1:]), dtype)

    def get(self, key):
        i, begin, end, shape, dtype = self._entries[key]
        return self._tensor(i, begin, end - begin, shape, dtype)

    def read_into(self, key, out, rows=None):
        i, begin, end, shape, dtype = self._entries[key]
        if out.dtype != dtype or not out.is_contiguous():
            return super().read_into(key, out, rows)
        if rows is not None and shape:
            row_bytes = (end - begin) // shape[0]
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
        if end > begin:
            self._read(self._fds[i], begin, end - begin, out.reshape(-1).view(torch.uint8).numpy())

    def _tensor(self, i, offset, size, shape, dtype):
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._read(self._fds[i], offset, size), dtype=dtype).reshape(shape)

    def close(self):
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class TorchBinSource(TensorSource):
    """PyTorch pickle checkpoints (.bin); each file is loaded whole (mmap=True) when first needed,
    and only one file is kept at a time."""

    def __init__(self, files: list[Path], name: str, directory: Path | None = None, weight_map: dict | None = None):
        self.name = name
        self.directory = directory
        self._files = files
        self._current: tuple[int, dict] | None = None
        if weight_map is None:
            weight_map = {}
            for i, f in enumerate(files):
                for k in self._load(i):
                    weight_map[k] = f.name
        name_to_index = {f.name: i for i, f in enumerate(files)}
        self._where = {k: name_to_index[v] for k, v in weight_map.items()}

    def _load(self, i: int) -> dict:
        if self._current is not None and self._current[0] == i:
            return self._current[1]
        self._current = None  # drop the previous file before loading the next
        f = self._files[i]
        try:
            try:
                sd = torch.load(str(f), map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):  # legacy (non-zip) files cannot be memory-mapped
                    raise
                sd = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise read_error(f, exc, "PyTorch") from exc
        if not isinstance(sd, dict):
            raise CheckpointError(f"{f} does not hold a state dict (got {type(sd).__name__})")
        sd = sd.get("state_dict", sd) if "state_dict" in sd and isinstance(sd["state_dict"], dict) else sd
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(
                    f"{f}: entry {k!r} is not a tensor ({type(v).__name__}); a checkpoint to merge must hold only "
                    "the model's weights - save it with torch.save(model.state_dict(), ...) or model.save_pretrained(...)")
        self._current = (i, sd)
        return sd

    def keys(self):
        return list(self._where)

    def get(self, key):
        return self._load(self._where[key])[key]

    def close(self):
        self._current = None


def _files_from_index(index_path: Path) -> tuple[list[Path], dict]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except Exception as exc:
        raise CheckpointError(f"cannot read index {index_path}: {exc}") from exc
    names = list(dict.fromkeys(weight_map.values()))
    files = [index_path.parent / n for n in names]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"index {index_path} lists shard files that do not exist: {missing}")
    return files, weight_map


def is_lora_adapter(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / ADAPTER_CONFIG).exists()


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint(spec) -> Path:
    """A local path as given, or a Hugging Face Hub model id resolved to its (cached) snapshot."""
    path = Path(spec)
    if path.exists() or not _REPO_ID.match(str(spec)):
        return path
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(str(spec), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(str(spec), allow_patterns=["*.json", "*.bin", "*.txt", "*.model"]))
        return local
    except Exception as exc:
        raise CheckpointError(
            f"{spec!r} is not a local path and could not be fetched from the Hugging Face Hub ({exc}); "
            "download it first or give a local directory"
        ) from exc


def open_source(spec) -> TensorSource:
    """A `TensorSource` for a state dict, an HF model directory (or Hub id), or a checkpoint file/index."""
    if isinstance(spec, TensorSource):
        return spec
    if isinstance(spec, Mapping):
        return DictSource(spec)
    path = resolve_checkpoint(spec)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist (expected an HF model directory or a .safetensors/.bin file)")
    if path.is_dir():
        if (path / SAFE_INDEX).exists():
            files, _ = _files_from_index(path / SAFE_INDEX)
            return SafetensorsSource(files, str(path), path)
        if (path / SAFE_SINGLE).exists():
            return SafetensorsSource([path / SAFE_SINGLE], str(path), path)
        if (path / BIN_INDEX).exists():
            files, wm = _files_from_index(path / BIN_INDEX)
            return TorchBinSource(files, str(path), path, wm)
        if (path / BIN_SINGLE).exists():
            return TorchBinSource([path / BIN_SINGLE], str(path), path)
        shards = sorted(path.glob("*.safetensors"))
        if shards:
            return SafetensorsSource(shards, str(path), path)
        raise CheckpointError(
            f"no weights found in {path}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
            + (" (this is a PEFT adapter directory; pass it as a fine-tuned model, not as the base)" if is_lora_adapter(path) else "")
        )
    if path.name.endswith(".index.json"):
        files, wm = _files_from_index(path)
        if files and files[0].suffix == ".safetensors":
            return SafetensorsSource(files, str(path), path.parent)
        return TorchBinSource(files, str(path), path.parent, wm)
    if path.suffix == ".safetensors":
        return SafetensorsSource([path], str(path), path.parent)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return TorchBinSource([path], str(path), path.parent)
    raise CheckpointError(f"do not know how to read {path}: use a directory, .safetensors, .bin or an *.index.json file")


# ----------------------------------------------------------------------------------------------
# sinks


class DictSink:
    def __init__(self, shapes: Mapping[str, tuple] | None = None):
        self.state_dict: dict[str, torch.Tensor] = {}
        self.shapes = shapes or {}

    def write(self, key: str, tensor: torch.Tensor, start_row: int | None = None) -> None:
        if start_row is None:
            self.state_dict[key] = tensor
            return
        if key not in self.state_dict:  # row blocks of one tensor: assemble in place
            self.state_dict[key] = torch.empty(self.shapes[key], dtype=tensor.dtype)
        self.state_dict[key][start_row:start_row + tensor.shape[0]] = tensor

    def close(self) -> dict:
        return self.state_dict


def parse_size(size) -> int:
    """'2GB' / '500MB' / '20KB' / int bytes -> bytes (decimal units, as transformers uses)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. '2GB', '500MB' or a number of bytes")
    unit = (m.group(2) or "B").upper()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * factor)


_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class ShardedSafetensorsSink:
    """Write tensors straight into pre-laid-out safetensors shards of at most `max_shard_size`
    bytes (a larger single tensor gets its own shard) plus `model.safetensors.index.json`, named as
    `save_pretrained` names them. The layout (every key's shape and dtype) is known before
    merging, so each shard's header is written first and each tensor (or row block of a tensor)
    is written at its offset as soon as it is computed: memory stays at one piece."""

    def __init__(self, directory, layout: list[tuple[str, tuple, torch.dtype]], max_shard_size="2GB",
                 metadata: dict | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        max_bytes = parse_size(max_shard_size)
        meta = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, tuple, torch.dtype, int]]] = [[]]
        size = 0
        for key, shape, dtype in layout:
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append((key, tuple(shape), dtype, nbytes))
            size += nbytes
        n = len(shards)
        self.files: list[Path] = []
        self._where: dict[str, tuple[int, int, tuple, torch.dtype]] = {}  # key -> (file, offset, shape, dtype)
        self._written: dict[str, int] = {}
        self.total_bytes = 0
        self.total_params = 0
        self._handles = []
        for i, entries in enumerate(shards):
            name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header, offset = {"__metadata__": meta}, 0
            for key, shape, dtype, nbytes in entries:
                header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
            path = self.directory / name
            f = open(path, "wb")
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            f.truncate(8 + len(raw) + offset)
            data_start = 8 + len(raw)
            for key, shape, dtype, nbytes in entries:
                self._where[key] = (i, data_start + int(header[key]["data_offsets"][0]), shape, dtype)
                self.total_bytes += nbytes
                self.total_params += int(torch.Size(shape).numel())
            self.files.append(path)
            self._handles.append(f)

    def write(self, key: str, tensor: torch.Tensor, start_row: int | None = None) -> None:
        if key not in self._where:
            raise KeyError(f"{key!r} is not part of the output layout")
        i, offset, shape, dtype = self._where[key]
        tensor = tensor.detach().to(dtype).contiguous()
        if start_row is None and tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {key!r} has shape {list(tensor.shape)}, expected {list(shape)}")
        row_bytes = (int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1) * tensor.element_size()
        f = self._handles[i]
        f.seek(offset + (start_row or 0) * row_bytes)
        data = tensor.reshape(-1)
        f.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        self._written[key] = self._written.get(key, 0) + tensor.numel()

    def close(self) -> list[Path]:
        handles, self._handles = self._handles, []
        try:
            for f in handles:
                f.close()
        finally:
            self._abort(handles)
        missing = [k for k, (_, _, shape, _) in self._where.items() if self._written.get(k, 0) != torch.Size(shape).numel()]
        if missing:
            raise RuntimeError(f"internal error: tensors not (fully) written: {missing[:5]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_parameters": self.total_params, "total_size": self.total_bytes},
                     "weight_map": {k: self.files[i].name for k, (i, *_rest) in sorted(self._where.items())}}
            (self.directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return list(self.files)

    @staticmethod
    def _abort(handles) -> None:
        # After a failure (disk full...) close without raising again, so no "Exception ignored"
        # noise appears when the half-written files are garbage-collected.
        for f in handles:
            try:
                f.close()
            except OSError:
                pass

    def __del__(self):
        self._abort(getattr(self, "_handles", []))


def weight_files(directory: Path) -> Iterable[Path]:
    for p in directory.iterdir():
        if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt") or p.name.endswith(".index.json"):
            yield p
