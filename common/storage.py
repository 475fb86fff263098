"""Where an output lives: a local path or a pyarrow filesystem URI (s3://, gs://, hdfs://, file://).

An output is built in a *staging* folder beside its final location and moved into place only once
it is complete, so readers never see half an output and a failed run leaves the previous one alone.
"""

from __future__ import annotations

import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from common.errors import InputError


@dataclass(frozen=True)
class Location:
    """A folder on a filesystem; ``uri`` is what the user wrote, for messages."""

    filesystem: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def join(self, relative: str) -> str:
        return posixpath.join(self.path, relative)

    def sibling(self, name: str) -> Location:
        return Location(self.filesystem, posixpath.join(posixpath.dirname(self.path), name), self.uri)


def resolve(uri: str, setting: str = "output") -> Location:
    """A local path (relative paths are made absolute) or a URI pyarrow understands (file://, s3://, gs://);
    ``setting`` names what the URI is for in the error."""
    if "://" not in uri:
        return Location(pafs.LocalFileSystem(), Path(uri).expanduser().resolve().as_posix(), uri)
    try:
        filesystem, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
        raise InputError(f"{setting}: cannot open {uri!r}: {err}") from None
    return Location(filesystem, path.rstrip("/"), uri)


def file_uri(location: Location, path: str) -> str:
    """A file at ``path`` on the location's filesystem, named so that ``resolve`` opens it again: its path
    when local, else the location's URI extended by the file's relative path (its ?options kept)."""
    if location.is_local:
        return path
    if path == location.path:
        return location.uri
    base, _, options = location.uri.partition("?")
    return f"{base.rstrip('/')}/{posixpath.relpath(path, location.path)}" + (f"?{options}" if options else "")


def exists(location: Location, relative: str = "") -> bool:
    path = location.join(relative) if relative else location.path
    return location.filesystem.get_file_info(path).type != pafs.FileType.NotFound


def write_table(table: pa.Table, location: Location, relative: str) -> None:
    path = location.join(relative)
    location.filesystem.create_dir(posixpath.dirname(path), recursive=True)
    pq.write_table(table, path, filesystem=location.filesystem)


def read_table(location: Location, relative: str) -> pa.Table:
    """One Parquet file, or every ``*.parquet`` file of a folder concatenated in file-name order."""
    path = location.join(relative)
    info = location.filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{location.uri}: {relative} is missing")
    if info.type == pafs.FileType.File:
        return pq.read_table(path, filesystem=location.filesystem)
    files = sorted(f.path for f in location.filesystem.get_file_info(pafs.FileSelector(path)) if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
    return pa.concat_tables([pq.read_table(f, filesystem=location.filesystem) for f in files])


def write_text(location: Location, relative: str, text: str) -> None:
    with location.filesystem.open_output_stream(location.join(relative)) as stream:
        stream.write(text.encode())


def read_text(location: Location, relative: str) -> str:
    path = location.join(relative)
    try:
        with location.filesystem.open_input_stream(path) as stream:
            return stream.read().decode()
    except FileNotFoundError:
        raise InputError(f"{location.uri}: {relative} not found") from None
    except OSError as err:  # a file where a folder belongs, a folder where the file does
        raise InputError(f"{location.uri}: {relative} cannot be read ({err.strerror or err})") from None


def upload_folder(local: Path, target: Location, last: str | None = None) -> None:
    """Copy the files of the local folder ``local`` under ``target``; files named ``last`` (a manifest that marks
    its folder complete) go after all the others, so a reader never sees one beside missing files."""
    files = sorted(path for path in local.rglob("*") if path.is_file())
    for file in sorted(files, key=lambda path: path.name == last):
        destination = target.join(file.relative_to(local).as_posix())
        target.filesystem.create_dir(posixpath.dirname(destination), recursive=True)
        pafs.copy_files(file.as_posix(), destination, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=target.filesystem)


def download_folder(source: Location, local: Path) -> None:
    """Copy every file under ``source`` into the local folder ``local``."""
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(source.path, local.as_posix(), source_filesystem=source.filesystem, destination_filesystem=pafs.LocalFileSystem())


def open_staging(target: Location) -> Location:
    """Create an empty staging folder beside ``target``; InputError when the location is not writable."""
    name = posixpath.basename(target.path) or "output"
    staging = target.sibling(f".{name}.staging-{uuid.uuid4().hex[:12]}")
    try:
        staging.filesystem.create_dir(staging.path, recursive=True)
        write_text(staging, ".probe", "")
        staging.filesystem.delete_file(staging.join(".probe"))
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"output {target.uri!r} is not writable: {err}") from None
    return staging


def discard(staging: Location) -> None:
    if exists(staging):
        staging.filesystem.delete_dir(staging.path)


def commit(staging: Location, target: Location, marker: str, marker_text: str) -> None:
    """Put the complete staging folder at ``target``, replacing what was there.

    A folder is complete exactly when it has its ``marker`` file (a manifest), written last. Locally the new folder gets its manifest
    and is swapped in by renames. Object stores have no directory rename, so the old output first
    loses its manifest (it stops counting as complete), is emptied, receives the new files, and
    gets the new manifest last: an interrupted copy leaves a folder without a manifest, never a
    mix that looks complete.
    """
    fs = target.filesystem
    if target.is_local:
        write_text(staging, marker, marker_text)
        fs.create_dir(posixpath.dirname(target.path), recursive=True)
        retired = target.sibling(f".{posixpath.basename(target.path)}.old-{uuid.uuid4().hex[:12]}")
        if exists(target):
            fs.move(target.path, retired.path)
        fs.move(staging.path, target.path)
        discard(retired)
        return
    if exists(target, marker):
        fs.delete_file(target.join(marker))
    if exists(target):
        fs.delete_dir_contents(target.path)
    pafs.copy_files(staging.path, target.path, source_filesystem=fs, destination_filesystem=fs)
    write_text(target, marker, marker_text)
    discard(staging)
