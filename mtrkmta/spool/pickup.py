"""Files of the pickup directory (Postfix's maildrop): written by sendmail, read by the node.

A pickup file is laid out exactly as a spool file (``mtrkmta.spool.filespool``: header,
content, envelope, with lengths and a CRC), and named by the queue id the message will
have, so that the node can tell whether it already queued a file it finds again after a
crash. ``write_pickup`` makes a file durable as the spool does (temporary name, fsync,
rename, fsync of the directory); ``read_pickup`` reads one file as hostile input: only a
regular file, never through a symbolic link, its size bounded before anything is read.

The directory (``<data_dir>/pickup``, mode 1733: anyone may create a file in it, no one
but its owner may list it or remove another's file) belongs to the node's user. A file
is mode 0644 so that the node can read it whoever wrote it; its name is a queue id (45
random bits) in a directory others cannot list.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

from mtrkmta.envelope import Envelope
from mtrkmta.spool.filespool import (
    HEADER_SIZE,
    MAGIC,
    check_queue_id,
    encode_message,
    read_message,
    sync_directory,
)
from mtrkmta.spool.interfaces import SpoolCorruption

PICKUP_DIR = "pickup"
REJECTED_DIR = "pickup-rejected"  # malformed pickup files, kept for the administrator
TEMP_PREFIX = ".tmp-"  # a file being written; never read, removed when stale
DIR_MODE = 0o1733
FILE_MODE = 0o644
MAX_ENVELOPE = 1024 * 1024  # octets of encoded envelope a pickup file may carry
_LENGTHS = struct.Struct(">4sHIQ")  # as the spool file header: magic, version, lengths


class PickupError(ValueError):
    """A pickup file that is not a well-formed message within the limits; the text says why."""


def pickup_directory(data_dir: Path) -> Path:
    """The pickup directory of the node whose data directory is ``data_dir``."""
    return data_dir / PICKUP_DIR


def ensure_pickup_directory(data_dir: Path) -> Path:
    """Create ``<data_dir>/pickup`` (mode 1733) if it is missing, durably; return it.

    When root creates it (sendmail run by root before the node ever started), it is
    given to the owner of the data directory, the node's user. Blocking.
    """
    directory = pickup_directory(data_dir)
    try:
        os.mkdir(directory, DIR_MODE)
    except FileExistsError:
        return directory
    os.chmod(directory, DIR_MODE)  # the umask took the sticky and write bits away
    if os.geteuid() == 0:
        owner = os.stat(data_dir)
        os.chown(directory, owner.st_uid, owner.st_gid)
    sync_directory(data_dir)
    return directory


def write_pickup(
    directory: Path, envelope: Envelope, content: bytes, *, fsync: bool = True
) -> Path:
    """Write one message into the pickup directory durably; return its path. Blocking.

    The file is written under a temporary name, fsync'd, renamed to its queue id and
    the directory fsync'd: once this returns, the message survives a crash. A user
    who may not read the directory (mode 1733) cannot open it to fsync it; the file
    is then fsync'd again after the rename, which on ext4, XFS and btrfs commits the
    rename with it (their journal or log commit carries every earlier change to the
    directory); POSIX itself promises that only for the directory's own fsync.
    """
    queue_id = check_queue_id(envelope.queue_id)
    header, envelope_data = encode_message(envelope, content)
    temporary = directory / f"{TEMP_PREFIX}{queue_id}"
    final = directory / queue_id
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, FILE_MODE)
    try:
        try:
            os.fchmod(fd, FILE_MODE)  # whatever the caller's umask
            for part in (header, content, envelope_data):
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        except BaseException:
            os.unlink(temporary)
            raise
        os.rename(temporary, final)
        if fsync:
            try:
                sync_directory(directory)
            except PermissionError:
                os.fsync(fd)
    finally:
        os.close(fd)
    return final


def encode_pickup(envelope: Envelope, content: bytes) -> bytes:
    """The whole pickup file for ``envelope`` and ``content`` (pure; for tests and tools)."""
    header, envelope_data = encode_message(envelope, content)
    return header + content + envelope_data


def read_pickup(path: Path, max_content: int) -> tuple[Envelope, bytes, int]:
    """The envelope, content and owner's uid of one pickup file. Blocking.

    Raises PickupError when the file is not a regular file (a link, a directory, a
    FIFO), when its content is over ``max_content`` octets or its envelope over
    MAX_ENVELOPE (checked before either is read), or when it is damaged in any way
    the spool's reader detects; OSError when it cannot be opened.
    """
    name = path.name
    try:
        check_queue_id(name)
    except ValueError:
        raise PickupError(f"{name!r} is not a queue id") from None
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise PickupError("not a regular file")
    with os.fdopen(fd, "rb") as f:
        size = info.st_size
        header = f.read(HEADER_SIZE)
        if len(header) < HEADER_SIZE:
            raise PickupError(f"truncated: {size} octets")
        magic, _, envelope_length, content_length = _LENGTHS.unpack_from(header)
        if magic != MAGIC:
            raise PickupError(f"bad magic {magic!r}: not a message file")
        if content_length > max_content:
            raise PickupError(
                f"message of {content_length} octets over limits.message_size ({max_content})"
            )
        if envelope_length > MAX_ENVELOPE:
            raise PickupError(f"envelope of {envelope_length} octets over {MAX_ENVELOPE}")
        f.seek(0)
        try:
            envelope, content = read_message(f, size, name)
        except SpoolCorruption as error:
            raise PickupError(str(error).removeprefix(f"{name}: ")) from None
    return envelope, content, info.st_uid
