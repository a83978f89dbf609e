"""Parquet shards of records: naming, atomic writes, typed reads, staged stage outputs.

A stage writes its whole output folder under a staging name and swaps it in at the end, so a
killed stage leaves the previous output (or nothing), never a half-written one
(`pipeline.core.output_folders` says which folders a stage may replace). Single files are written to
a temporary name in the same folder and renamed.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from pipeline.core.errors import BadShardError, UnsafePathError
from pipeline.core.output_folders import staged_folder  # noqa: F401 (stages import it from here)
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
    """The shard files in `folder` (optionally of one split), in name order. A folder that
    cannot be listed is a BadShardError naming it; one that is missing has no shards."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    try:
        names = sorted(p.name for p in folder.iterdir())
    except OSError as exc:
        raise BadShardError(f"shard folder cannot be listed ({_reason(exc)})", folder) from None
    found = []
    for name in names:
        m = SHARD_RE.match(name)
        if m and (split is None or m.group("split") == split):
            found.append(folder / name)
    return found


def to_table(records: Sequence[BaseModel], model: type[BaseModel]) -> pa.Table:
    schema = arrow_schema(model)
    return pa.Table.from_pylist([r.model_dump() for r in records], schema=schema)


def from_table(table: pa.Table, model: type[M], path: Path | str | None = None,
               fill: dict | None = None) -> list[M]:
    """The rows of `table` as `model` records (with the fields in `fill` set on each); a row
    that is not one is a BadShardError naming the row, the field and `path` (its shard)."""
    records = []
    for i, row in enumerate(table.to_pylist()):
        try:
            records.append(model.model_validate({**row, **fill} if fill else row))
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            raise BadShardError(f"row {i} is not a valid {model.__name__} record "
                                f"({key}: {err['msg']})", path) from None
    return records


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    first = str(exc).strip().splitlines()
    return first[0][:200] if first else type(exc).__name__


def check_shard(path: Path, model: type[BaseModel]) -> pa.Schema:
    """The Arrow schema of a shard, after checking that it is a Parquet file that holds
    `model` records: the record type written into its metadata (schemas.arrow_schema), or,
    for a file without one, every column `model` needs. Anything else is a BadShardError
    saying what the file holds and what the stage expects."""
    path = Path(path)
    if path.is_dir():
        raise BadShardError("a folder named like a shard, not a Parquet file", path)
    try:
        found = pq.read_schema(path)
    except FileNotFoundError:
        raise BadShardError("shard not found", path) from None
    except (pa.ArrowException, OSError, ValueError) as exc:
        reason = _reason(exc)
        if "magic bytes" in reason:
            reason = "no Parquet footer: another kind of file, or a truncated one"
        raise BadShardError(f"not a Parquet file ({reason})", path) from None
    meta = found.metadata or {}
    record = meta.get(b"geopixeld.record", b"").decode("utf-8", "replace")
    if record and record != model.__name__:
        raise BadShardError(f"holds {record} records, not the {model.__name__} records this "
                            "stage reads (a folder of another stage's output?)", path)
    expected = arrow_schema(model)
    # an optional column a file lacks reads as null (a shard of an older schema version)
    missing = [f.name for f in expected if not f.nullable and f.name not in found.names]
    if missing:
        what = f"{record} shard" if record else "Parquet file"
        raise BadShardError(f"this {what} has no column {missing[0]!r} of the {model.__name__} "
                            "records this stage reads (not a shard of this pipeline, or of "
                            "another schema version?)", path)
    return found


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
    for name in skip_bytes:
        if name not in schema.names or not pa.types.is_binary(schema.field(name).type):
            raise ValueError(f"{model.__name__}.{name} is not a binary field")
    check_shard(path, model)
    try:
        if not skip_bytes:
            table = pq.read_table(path, schema=schema)
        else:
            table = pq.read_table(path, schema=schema,
                                  columns=[n for n in schema.names if n not in skip_bytes])
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise BadShardError(f"cannot be read as {model.__name__} records (a column of "
                            f"another type, or a corrupt file: {_reason(exc)})", path) from None
    empty = {n: None if schema.field(n).nullable else b"" for n in skip_bytes}
    return from_table(table, model, path, fill=empty)


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


def chunked(items: Sequence[M] | Iterable[M], size: int) -> list[list[M]]:
    """Split into consecutive chunks of at most `size` items."""
    items = list(items)
    return [items[i:i + size] for i in range(0, len(items), size)] or []
