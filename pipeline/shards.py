"""Parquet shards of records: naming, atomic writes, typed reads, staged stage outputs.

A stage writes its whole output folder under a staging name and swaps it in at the end, so a
killed stage leaves the previous output (or nothing), never a half-written one. Single files are
written to a temporary name in the same folder and renamed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from pipeline.errors import BadAnnotationError, UnsafePathError
from schemas import arrow_schema

M = TypeVar("M", bound=BaseModel)

SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_.-]+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.parquet$")
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def shard_name(split: str, index: int, count: int) -> str:
    """Hugging Face style shard name: `{split}-{i:05d}-of-{n:05d}.parquet`."""
    return f"{safe_name(split, 'split')}-{index:05d}-of-{count:05d}.parquet"


def safe_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a plain file name that cannot escape a folder, else raise."""
    if not SAFE_NAME_RE.match(name) or name in {".", ".."} or ".." in name:
        raise UnsafePathError(f"{what} {name!r} is not a safe file name", path=name)
    return name


def safe_join(folder: Path, name: str) -> Path:
    """`folder / name`, refusing names that would land outside `folder`."""
    target = (folder / name).resolve()
    if folder.resolve() not in target.parents:
        raise UnsafePathError(f"{name!r} would be written outside {folder}", path=name)
    return folder / name


def list_shards(folder: Path, split: str | None = None) -> list[Path]:
    """The shard files in `folder` (optionally of one split), in name order."""
    if not folder.is_dir():
        return []
    found = []
    for p in sorted(folder.iterdir()):
        m = SHARD_RE.match(p.name)
        if m and (split is None or m.group("split") == split):
            found.append(p)
    return found


def to_table(records: Sequence[BaseModel], model: type[BaseModel]) -> pa.Table:
    schema = arrow_schema(model)
    return pa.Table.from_pylist([r.model_dump() for r in records], schema=schema)


def from_table(table: pa.Table, model: type[M]) -> list[M]:
    return [model.model_validate(row) for row in table.to_pylist()]


def _leaf_columns(field: pa.Field, prefix: str = "") -> Iterator[tuple[str, pa.DataType]]:
    """(Parquet column path, type) of every leaf under an Arrow field ("image.bytes",
    "objects.list.element.mask.counts")."""
    name, dtype = prefix + field.name, field.type
    if pa.types.is_struct(dtype):
        for child in dtype:
            yield from _leaf_columns(child, name + ".")
    elif pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        yield from _leaf_columns(pa.field("element", dtype.value_type), name + ".list.")
    else:
        yield name, dtype


def _is_bytes(dtype: pa.DataType) -> bool:
    return pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype)


def compression(schema: pa.Schema) -> dict[str, str]:
    """Parquet codec per leaf column: zstd, except binary columns (PNG bytes do not compress;
    zstd would only spend time on them)."""
    return {name: "none" if _is_bytes(dtype) else "zstd"
            for field in schema for name, dtype in _leaf_columns(field)}


def write_table(path: Path, table: pa.Table, row_group_size: int | None = None) -> Path:
    """Write one Parquet file atomically (codecs by `compression`). Binary columns get neither
    a dictionary nor min/max statistics: images are unique, their bytes' order means nothing,
    and a dictionary of whole images made writing and reading slow."""
    small = [name for field in table.schema for name, dtype in _leaf_columns(field)
             if not _is_bytes(dtype)]
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=compression(table.schema),
                       row_group_size=row_group_size, use_dictionary=small,
                       write_statistics=small)
    return path


def write_records(path: Path, records: Sequence[BaseModel], model: type[BaseModel],
                  row_group_size: int | None = None) -> Path:
    """Write `records` as one Parquet file, atomically."""
    return write_table(path, to_table(records, model), row_group_size)


def read_records(path: Path, model: type[M], skip_bytes: Sequence[str] = ()) -> list[M]:
    """Read one shard into records of `model`. Binary fields named in `skip_bytes` (images a
    stage does not look at) are not read and come back empty: None where optional, else b""."""
    schema = arrow_schema(model)
    if not skip_bytes:
        return from_table(pq.read_table(path, schema=schema), model)
    for name in skip_bytes:
        if name not in schema.names or not pa.types.is_binary(schema.field(name).type):
            raise ValueError(f"{model.__name__}.{name} is not a binary field")
    table = pq.read_table(path, schema=schema,
                          columns=[n for n in schema.names if n not in skip_bytes])
    empty = {n: None if schema.field(n).nullable else b"" for n in skip_bytes}
    return [model.model_validate({**row, **empty}) for row in table.to_pylist()]


def read_json(path: Path, what: str) -> object:
    """Parse a JSON file the user gave; a missing or malformed one is a BadAnnotationError
    naming `what` and the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadAnnotationError(f"{what} not found", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadAnnotationError(f"{what} is not valid JSON ({exc})", path) from None


def write_json(path: Path, payload: object) -> Path:
    """Write JSON atomically, keys sorted, so identical content gives identical bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are meant to be shared
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def staged_folder(folder: Path) -> Iterator[Path]:
    """Yield an empty staging folder that replaces `folder` only if the block succeeds."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # what a killed run of this stage left behind (a run that dies cannot clean up after itself)
    for stale in folder.parent.glob(f".{folder.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in folder.parent.glob(f".{folder.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)  # mkdtemp makes 0700 folders
        retired = None
        if folder.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, retired / folder.name)
        os.replace(staging, folder)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def chunked(items: Sequence[M] | Iterable[M], size: int) -> list[list[M]]:
    """Split into consecutive chunks of at most `size` items."""
    items = list(items)
    return [items[i:i + size] for i in range(0, len(items), size)] or []
