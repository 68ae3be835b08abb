"""Atomic file writes and safetensors checkpoints.

Every file a run writes goes to a temporary name in the same folder and is then renamed over the
target (``os.replace`` is atomic on POSIX), so a crash leaves either the old file or the new one,
never half of one, and every file gets the mode ``open`` would have given it. Checkpoints are
safetensors, never pickle: loading one cannot run code.

Integrity: :func:`save_tensors` records in the safetensors metadata a SHA-256 of every tensor
(its dtype, shape and bytes) under ``__checksums__`` and a SHA-256 of all the other metadata
under ``__metadata_sha256__``; :func:`load_tensors` and :func:`read_metadata` verify them, so a
flipped bit anywhere in the file (header, metadata or data) is an error naming the file and the
tensor, not a model that silently samples 3e15. A file holding neither key (written before
checksums, or by another program) is read as it is.

JSON is strict: :func:`write_json` refuses NaN and infinities, naming the key, since other tools
cannot parse them; :func:`read_json` refuses NaN (it reads the ``Infinity`` older runs wrote)
and says which file is not valid JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def _file_mode() -> int:
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


# mkstemp makes files private (0600); renamed into place they get what open() would have given.
# Read once: os.umask is process-wide and not safe to flip from several threads.
_FILE_MODE = _file_mode()


CHECKSUMS_KEY = "__checksums__"
METADATA_CHECKSUM_KEY = "__metadata_sha256__"


class FileError(RuntimeError):
    """A file the library reads that is missing, damaged or not what it should be."""


class CheckpointError(FileError):
    """A checkpoint that is missing, corrupt or inconsistent with its run."""


class NonFiniteError(ValueError):
    """A result holding NaN or an infinity, which is refused rather than written."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # After the write: a writer that replaces the file (safetensors does) makes it 0600.
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Delete the temporary files :func:`atomic_path` left in ``directory`` when its process was
    killed mid-write (nothing else names files ``.<name>.<random>.tmp``)."""
    for path in Path(directory).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def non_finite_key(obj: Any, where: str = "") -> str | None:
    """The path (``a/b`` or ``a[3]``) of the first NaN or infinite float in ``obj``, or None."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else where
    if isinstance(obj, dict):
        items = ((f"{where}/{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, list | tuple):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for key, value in items:
        found = non_finite_key(value, key)
        if found is not None:
            return found
    return None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON; NonFiniteError naming the key of a NaN or infinity."""
    key = non_finite_key(obj)
    if key is not None:
        raise NonFiniteError(f"{key} is not a finite number; {Path(path).name} not written "
                             "(JSON has no NaN or infinity)")
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _refuse_constant(name: str) -> Any:
    # Runs made before strict JSON wrote deep RL's default target_return as Infinity; it still
    # reads. NaN never does.
    if name in ("Infinity", "-Infinity"):
        return float(name.replace("Infinity", "inf"))
    raise ValueError(f"{name} is not JSON")


def loads_json(text: str, what: str) -> Any:
    """Strict ``json.loads`` (no NaN or Infinity); FileError naming ``what`` when it fails."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as err:
        raise FileError(f"{what} is not valid JSON: {err}") from None


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; FileError if it is missing, unreadable or not strict JSON."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise FileError(f"{path} cannot be read: {err}") from None
    return loads_json(text, str(path))


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (a changed shape with the same bytes, or
    the same shape with other bytes, gives another digest)."""
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _metadata_digest(metadata: dict[str, str]) -> str:
    rest = {k: v for k, v in metadata.items() if k != METADATA_CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    # safetensors refuses tensors that share memory or are views: store contiguous copies.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = dict(metadata or {})
    reserved = {CHECKSUMS_KEY, METADATA_CHECKSUM_KEY} & set(metadata)
    if reserved:
        raise ValueError(f"metadata key {sorted(reserved)[0]} is reserved for checksums")
    metadata[CHECKSUMS_KEY] = json.dumps({k: tensor_digest(v) for k, v in tensors.items()},
                                         sort_keys=True)
    metadata[METADATA_CHECKSUM_KEY] = _metadata_digest(metadata)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _unreadable(path: str | os.PathLike, err: Exception) -> CheckpointError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return CheckpointError(f"{path} is not a readable safetensors file: {reason}")


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, after checking the file's checksums."""
    checksums = _checksums(path, _verified_metadata(path))
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _unreadable(path, err) from None
    if checksums is not None:
        if set(tensors) != set(checksums):
            name = sorted(set(tensors) ^ set(checksums))[0]
            state = "is missing" if name in checksums else "is not in its checksums"
            raise CheckpointError(f"{path} is corrupt: tensor {name} {state}")
        for name, tensor in tensors.items():
            if tensor_digest(tensor) != checksums[name]:
                raise CheckpointError(f"{path} is corrupt: tensor {name} does not match its "
                                      "checksum")
    return tensors


def _checksums(path: str | os.PathLike, metadata: dict[str, str]) -> dict[str, str] | None:
    if CHECKSUMS_KEY not in metadata:
        return None  # written before checksums, or by another program
    checksums = loads_json(metadata[CHECKSUMS_KEY], f"{path}: the checksums")
    if not isinstance(checksums, dict):
        raise CheckpointError(f"{path} is corrupt: its checksums are not a mapping")
    return checksums


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file, after checking its checksum (the checksums left
    out)."""
    metadata = _verified_metadata(path)
    return {k: v for k, v in metadata.items() if k not in (CHECKSUMS_KEY, METADATA_CHECKSUM_KEY)}


def _verified_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _unreadable(path, err) from None
    present = {CHECKSUMS_KEY, METADATA_CHECKSUM_KEY} & set(metadata)
    if present and (len(present) < 2 or _metadata_digest(metadata) !=
                    metadata[METADATA_CHECKSUM_KEY]):
        raise CheckpointError(f"{path} is corrupt: its metadata does not match its checksum")
    return metadata
