"""torch.distributed.checkpoint folders read without running code from them.

DCP's own reader unpickles `.metadata` with a plain `pickle.load`, and its default planner loads the
non-tensor values of a state dict (an optimizer's param_groups: lr, betas, ...) with
`torch.load(weights_only=False)`: a crafted checkpoint would run any code on resume. Here `.metadata` goes
through an unpickler that admits only the classes DCP's metadata is made of (its dataclasses, torch.Size,
dtypes and layouts, paths) and the values through `torch.load(weights_only=True)`; the result is then
checked for shape (every storage entry a plain file name inside the folder). `check_dcp_folder` does all
of that without loading into anything, so a checkpoint can be judged before a run commits to it.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner.load_bytes uses
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)

METADATA = ".metadata"

_DCP = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[tuple[str, str], Any] = {
    **{
        (_DCP, name): getattr(torch.distributed.checkpoint.metadata, name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "MetadataIndex",
            "_MEM_FORMAT_ENCODING",
        )
    },
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    # a layout is pickled as a call of this lookup by name (torch.strided, ...)
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    # StorageMeta.checkpoint_id: the folder it was saved to
    **{("pathlib", name): getattr(pathlib, name) for name in ("PosixPath", "WindowsPath", "PurePosixPath")},
    **{("torch", name): v for name, v in vars(torch).items() if isinstance(v, torch.dtype)},
}
"""(module, name) -> the object: everything a DCP .metadata pickle may name (as torch 2.13 writes it)."""


class UnsafeCheckpoint(ValueError):
    """A DCP folder whose pickled parts name something other than checkpoint metadata; names the file."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused {module}.{name}: not part of checkpoint metadata"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused a persistent id: not part of checkpoint metadata")


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def read_metadata(folder: str | Path, name: str = METADATA) -> Metadata:
    """The Metadata of the DCP folder `folder` (file `name`), unpickled with only its own classes admitted.

    UnsafeCheckpoint, naming the file and what was refused, for anything else, and when an entry points
    outside the folder.
    """
    path = Path(folder) / name
    try:
        with open(path, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except OSError:
        raise
    except Exception as e:  # UnpicklingError, or a truncated / garbled stream
        raise UnsafeCheckpoint(f"{path} cannot be read as checkpoint metadata ({e})") from None
    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise UnsafeCheckpoint(f"{path} holds a {type(meta).__name__}, not checkpoint metadata")
    for key, value in meta.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(value, (TensorStorageMetadata, BytesStorageMetadata)):
            raise UnsafeCheckpoint(f"{path}: entry {key!r} is not checkpoint metadata")
    for info in (meta.storage_data or {}).values():
        ok = isinstance(info, _StorageInfo) and _plain_name(info.relative_path)
        if not ok or not all(isinstance(v, int) and v >= 0 for v in (info.offset, info.length)):
            raise UnsafeCheckpoint(f"{path}: a storage entry points outside {Path(folder).name}/ ({info!r})")
    return meta


class SafeReader(FileSystemReader):
    """DCP's file-system reader with `.metadata` read by `read_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")  # DCP falls back to a rank's own __<rank>.metadata when .metadata fails
        meta = read_metadata(Path(self.path), METADATA if rank is None else f"__{rank}{METADATA}")
        meta.storage_meta = meta.storage_meta or torch.distributed.checkpoint.metadata.StorageMeta()
        meta.storage_meta.load_id = self.load_id
        return meta


class SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner with the non-tensor values loaded by `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def check_dcp_folder(folder: str | Path) -> None:
    """Read a DCP folder's metadata and every non-tensor value the way SafeReader and SafePlanner do, loading
    into nothing; UnsafeCheckpoint names the file when something would be refused at load."""
    folder = Path(folder)
    meta = read_metadata(folder)
    for index, info in (meta.storage_data or {}).items():
        if not isinstance(meta.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue  # tensors are read by torch.load(weights_only=True) inside DCP itself
        path = folder / info.relative_path
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
        except Exception as e:
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsafeCheckpoint(
                f"{path}: the value of {index.fqn} cannot be loaded as data ({why})"
            ) from None
