"""Safe extraction of uploaded zips (adapters, runs): every member is checked before and while
writing, and nothing can land outside the destination folder."""

from __future__ import annotations

import io
import re
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from osrm_core.errors import ArchiveError

#: Most bytes an uploaded zip may unpack to.
MAX_UNZIPPED_BYTES = 1 << 30
#: Most members an uploaded zip may hold.
MAX_ZIP_MEMBERS = 20_000
#: Highest compression ratio of one member (a zip bomb packs far tighter).
MAX_COMPRESSION_RATIO = 200



_DRIVE = re.compile(r"^[A-Za-z]:")


def _shown(name: str, limit: int = 80) -> str:
    """A member name for a message: quoted, and cut if a hostile archive made it very long."""
    return repr(name if len(name) <= limit else name[: limit - 3] + "...")


def check_member_name(name: str) -> None:
    """Refuse absolute paths, ``..``, backslashes, drive letters and NUL in a zip member name."""
    if not name or "\x00" in name:
        raise ArchiveError(f"archive member {_shown(name)} has an empty or invalid name")
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        raise ArchiveError(f"archive member {_shown(name)} has an absolute path")
    if "\\" in name:
        raise ArchiveError(f"archive member {_shown(name)} contains a backslash")
    if ".." in PurePosixPath(name).parts:
        raise ArchiveError(f"archive member {_shown(name)} leaves the archive folder ('..')")


def safe_extract_zip(
    source: bytes | str | Path,
    dest: str | Path,
    *,
    max_bytes: int = MAX_UNZIPPED_BYTES,
    max_members: int = MAX_ZIP_MEMBERS,
) -> Path:
    """Extract a zip (bytes or a path) into ``dest`` after checking every member.

    Refused: not a zip, more than ``max_members`` members, a member name that is absolute or
    holds ``..``, a symbolic link, a compression ratio above ``MAX_COMPRESSION_RATIO``, more
    than ``max_bytes`` uncompressed (by the headers and
    again while writing, so a lying header cannot get past), encrypted members.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Exception:  # a crafted central directory fails in many ways (struct, seek, EOF, ...)
        raise ArchiveError("not a valid zip archive") from None
    dest = Path(dest).resolve()
    with zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise ArchiveError(f"the archive holds {len(infos)} members; at most {max_members} are allowed")
        total = 0
        for info in infos:
            check_member_name(info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ArchiveError(f"archive member {_shown(info.filename)} is a symbolic link")
            if info.flag_bits & 0x1:
                raise ArchiveError(f"archive member {_shown(info.filename)} is encrypted")
            if info.compress_size and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO:
                raise ArchiveError(
                    f"archive member {_shown(info.filename)} is compressed {info.file_size // info.compress_size}:1;"
                    f" at most {MAX_COMPRESSION_RATIO}:1 is allowed (a zip bomb?)"
                )
            total += info.file_size
            if total > max_bytes:
                raise ArchiveError(f"the archive unpacks to more than {max_bytes >> 20} MiB")
        dest.mkdir(parents=True, exist_ok=True)
        written = 0
        try:
            for info in infos:
                target = (dest / info.filename).resolve()
                if not target.is_relative_to(dest):
                    raise ArchiveError(f"archive member {_shown(info.filename)} leaves the archive folder")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > max_bytes:
                            raise ArchiveError(f"the archive unpacks to more than {max_bytes >> 20} MiB")
                        out.write(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as err:
            raise ArchiveError(f"the archive is damaged ({err})") from None
        except OSError as err:  # a name too long, a file where a folder must go, ...
            raise ArchiveError(
                f"archive member {_shown(info.filename)} cannot be written ({err.strerror or type(err).__name__})"
            ) from None
    return dest


def find_root_with(root: Path, filename: str) -> Path:
    """The one folder under ``root`` (itself included) that holds ``filename``."""
    hits = [p.parent for p in Path(root).rglob(filename) if "__MACOSX" not in p.parts]
    if not hits:
        raise ArchiveError(f"the archive holds no {filename}")
    if len(hits) > 1:
        raise ArchiveError(f"the archive holds {len(hits)} folders with {filename}; upload one per archive")
    return hits[0]


