"""Where the CLI may read and write: files of the input folder only, and nothing outside the output folder.

An input folder may come from anyone (a downloaded repository), so every name it supplies is checked before it
becomes a path: component names in ``model_index.json`` and shard names in an index must be plain file or folder
names; a symbolic link is followed only to a regular file inside the input folder (or, for a folder of a Hugging
Face cache snapshot, into that repository's ``blobs`` folder, where the cache keeps the files its links point
at); links to folders, FIFOs, devices and sockets are never followed or opened. On the output side, the output
may neither contain nor lie inside the input (or what the input's links point at), so ``--overwrite`` can only
ever replace the output folder itself.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from ..layers.files import NotRegularFileError, file_kind, open_regular
from .errors import CLIError


def input_roots(path: Path) -> list[Path]:
    """The folders an input may read through symbolic links: the input folder (a file's own folder, and the folder
    of the file it links to), plus, inside a Hugging Face cache snapshot
    (``<cache>/models--org--name/snapshots/<revision>/...``), the repository's ``blobs`` folder."""
    path = Path(path).absolute()
    base = path if path.is_dir() else path.parent
    roots = [Path(os.path.realpath(base))]
    if not path.is_dir():  # a file named on the command line may itself be a link: its target is what was asked for
        roots.append(Path(os.path.realpath(path)).parent)
    blobs = _cache_blobs(base)
    return list(dict.fromkeys([*roots, *([blobs] if blobs else [])]))


def _cache_blobs(folder: Path) -> Path | None:
    """The ``blobs`` folder of the Hugging Face cache repository ``folder`` is a snapshot (or part of one) of."""
    for parent in (folder, *folder.parents):
        if parent.parent.name == "snapshots" and parent.parent.parent.name.startswith(("models--", "datasets--")):
            return Path(os.path.realpath(parent.parent.parent / "blobs"))
    return None


def is_inside(path: Path, folder: Path) -> bool:
    """``path`` is ``folder`` or below it (both already resolved)."""
    return path == folder or folder in path.parents


def plain_name(name: object) -> bool:
    """A single file or folder name: not empty, not ``.``/``..``, no separator, no NUL, not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not os.path.isabs(name) and not (len(name) > 1 and name[1] == ":"))


def readable_problem(path: Path, roots: Sequence[Path]) -> str | None:
    """Why the CLI must not read ``path`` (a file it found in the input), or None when it may: it must be a regular
    file, and when it is a symbolic link, its target must lie inside one of ``roots``."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is {file_kind(info.st_mode)}, not a regular file; it is not read"
    target = Path(os.path.realpath(path))
    if not any(is_inside(target, root) for root in roots):  # only a link (to it or to a folder above) leads out
        return (f"{path} is a symbolic link to {target}, outside the input folder; diffusers-sdnq does not read "
                "files outside the folder it was given")
    return None


def check_out(src: Path, out: Path, overwrite: bool) -> Path:
    """Refuse an output that is the input, lies inside it, contains it (or the cache folder the input's links
    point into), or exists (unless ``overwrite``). Returns the absolute output path.

    With these rules ``--overwrite``, which deletes the old output once the new one is complete, can only ever
    delete the output folder itself."""
    src = Path(src).absolute()
    src_real = Path(os.path.realpath(src))
    blobs = _cache_blobs(src if src.is_dir() else src.parent)
    out = Path(out).absolute()
    out_real = Path(os.path.realpath(out))
    for root in dict.fromkeys([src_real, *([blobs] if blobs else [])]):
        what = f"the input {src}" if root == src_real else f"{root}, which holds the input's files"
        if is_inside(out_real, root):
            raise CLIError(f"output {out} must not be {what} or inside it")
        if is_inside(root, out_real):
            raise CLIError(f"output {out} must not contain {what}"
                           + (": --overwrite would delete it" if overwrite else ""))
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CLIError(f"{out} already exists; pass --overwrite to replace it")
    return out


def dest(folder: Path, name: str) -> Path:
    """``folder / name`` for an output path built from a name the input supplied; refuses anything but a plain
    name, so no write can land outside ``folder``."""
    if not plain_name(name):
        raise CLIError(f"refusing to write {name!r}: not a plain file or folder name (it would leave {folder})")
    return folder / name


def copy_entry(src: Path, dst: Path, roots: Sequence[Path]) -> None:
    """Copy a file or folder of the input to ``dst`` (which must not exist).

    Regular files are copied, and symbolic links to regular files inside ``roots`` as the file they point at.
    Anything else is refused with a :class:`CLIError` naming it: a link leaving the input, a link to a folder
    (never followed, so a link loop or a link to ``/`` cannot be copied), a FIFO, device or socket. Folders are
    walked without recursion (a deep tree cannot overflow the stack) and each real folder is entered once."""
    todo: list[tuple[Path, Path]] = [(src, dst)]
    seen: set[tuple[int, int]] = set()
    while todo:
        source, target = todo.pop()
        info = os.lstat(source)
        if stat.S_ISLNK(info.st_mode):
            try:
                pointed = os.stat(source)
            except OSError:
                raise CLIError(f"{source} is a broken symbolic link; remove it or restore what it points at"
                               ) from None
            if stat.S_ISDIR(pointed.st_mode):
                raise CLIError(f"{source} is a symbolic link to a folder ({os.path.realpath(source)}); "
                               "diffusers-sdnq does not follow linked folders (replace the link with a copy, or "
                               "remove it)")
            problem = readable_problem(source, roots)
            if problem:
                raise CLIError(problem)
            _copy_file(source, target)
        elif stat.S_ISDIR(info.st_mode):
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            target.mkdir()
            with os.scandir(source) as entries:
                names = sorted(entry.name for entry in entries)
            todo.extend((source / name, target / name) for name in reversed(names))
        elif stat.S_ISREG(info.st_mode):
            _copy_file(source, target)
        else:
            raise CLIError(f"{source} is {file_kind(info.st_mode)}, not a regular file; it is not copied (remove it)")


def _copy_file(source: Path, target: Path) -> None:
    """Copy one regular file's bytes and times (never blocks on a file swapped for a FIFO meanwhile)."""
    try:
        with open_regular(source) as fsrc, open(target, "xb") as fdst:
            shutil.copyfileobj(fsrc, fdst, 2**20)
    except NotRegularFileError as exc:
        raise CLIError(str(exc)) from None
    shutil.copystat(source, target)
