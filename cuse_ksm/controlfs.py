"""The control files mounted: a pyfuse3 adapter over the control tree, and the mount's lifetime.

The daemon mounts the control tree (pyfuse3, FUSE) at ``/run/cuse-ksm/<device
name>`` and serves it from the same trio loop as the device, so a file read
sees exactly the state the ioctls see and change, with no locking.  What the
files are, what a read returns and what a write does is decided in
:mod:`cuse_ksm.controltree`; this module only translates:

* :class:`ControlOperations`: pyfuse3 requests answered from the tree, its
  OSErrors turned into FUSE errors, plus what a tree knows nothing of
  (attributes, open files, snapshots for reads at an offset).
* :func:`serve`: the mount's lifetime.  A crashed daemon's stale mount is
  cleared first (:func:`prepare_mountpoint`); the mount goes away when the
  task ends, however it ends.

Only the daemon imports this module (pyfuse3 needs libfuse3); ``cuse-ksm
status`` and the command line's parser need only the tree.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from cuse_ksm import abi
from cuse_ksm.controltree import ControlTree, Node
from cuse_ksm.engine.scanner import BATCH_SECONDS

log = logging.getLogger(__name__)

# Longest the building of one file's contents holds the daemon's loop at a
# time: as long as one of the scanner's batches.
READ_SLICE = BATCH_SECONDS
# While the scanner runs, the most of the loop's time that building a large
# file (``pages`` of a multi-GiB region) may take: after each slice it waits
# 19 times as long, so that the scanner keeps 95 % (docs/benchmarks.md).
READ_SHARE = 0.05


# -- the pyfuse3 adapter -----------------------------------------------------------------


def _fuse_error(e: OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(e.errno or errno.EIO)


@dataclass
class _OpenFile:
    inode: int
    snapshot: bytes = b""


class ControlOperations(pyfuse3.Operations):
    """pyfuse3 requests answered from a :class:`ControlTree`.

    Attributes and entries are never cached by the kernel (timeouts 0): the
    numbers change all the time and process directories come and go.  Files
    are opened ``direct_io`` so every read reaches us and every write is
    delivered as written; a read at offset 0 takes a fresh snapshot and later
    offsets continue it, so ``cat`` never sees a number torn between two
    values, and ``pread(fd, 0)`` polls through a single open fd.
    """

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: ControlTree) -> None:
        super().__init__()
        self.tree = tree
        self._files: dict[int, _OpenFile] = {}
        self._fhs = itertools.count(1)
        self._mounted_ns = time.time_ns()

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = pyfuse3.InodeT(node.inode)
        a.generation = 0
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_mode = pyfuse3.ModeT(node.mode)
        a.st_nlink = 2 if node.is_dir else 1
        a.st_uid = 0
        a.st_gid = 0
        a.st_rdev = 0
        # sysfs reports a page for every attribute; with direct_io the size is only a hint.
        a.st_size = 0 if node.is_dir else abi.PAGE_SIZE
        a.st_blksize = abi.PAGE_SIZE
        a.st_blocks = 0
        a.st_atime_ns = a.st_ctime_ns = a.st_mtime_ns = self._mounted_ns
        return a

    def _node(self, inode: int) -> Node:
        node = self.tree.node(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        # ``echo 1 > run`` opens with O_TRUNC, which may come as a truncate:
        # sysfs ignores it, and so do we.  Modes and owners are fixed.
        node = self._node(inode)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attrs(node)

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        try:
            inode = self.tree.lookup(parent_inode, os.fsdecode(name))
        except OSError as e:
            raise _fuse_error(e) from None
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self._node(inode))

    async def forget(self, inode_list: Any) -> None:
        """Inodes are computed, not kept: nothing to forget."""

    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        if not self._node(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return pyfuse3.FileHandleT(inode)

    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        try:
            entries = self.tree.entries(fh)
        except OSError as e:
            raise _fuse_error(e) from None
        # start_id is the position after the last entry sent; entries are
        # listed in a stable order (process directories by pid).
        for pos, (name, inode) in enumerate(entries[start_id:], start=start_id + 1):
            node = self.tree.node(inode)
            if node is None:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(node), pos):
                return

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    async def open(self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        # Root passes default_permissions' check on a 0444 file; sysfs still
        # refuses to open a read-only attribute for writing, and so do we.
        if flags & os.O_ACCMODE != os.O_RDONLY and not node.mode & stat.S_IWUSR:
            raise pyfuse3.FUSEError(errno.EACCES)
        fh = next(self._fhs)
        self._files[fh] = _OpenFile(inode)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), direct_io=True, keep_cache=False)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        f = self._files[fh]
        if off == 0:
            try:
                f.snapshot = await self.contents(f.inode)
            except OSError as e:
                raise _fuse_error(e) from None
        return f.snapshot[off : off + size]

    async def contents(self, inode: int) -> bytes:
        """The file's contents, built piece by piece; the scanner and the device run between pieces
        whenever building has taken READ_SLICE seconds (a ``pages`` file of a multi-GiB region).

        While the scanner runs, each such pause lasts long enough that building
        takes at most READ_SHARE of the loop's time; otherwise it is a checkpoint.
        """
        parts = []
        clock = time.perf_counter
        start = clock()
        for part in self.tree.read_parts(inode):
            parts.append(part)
            spent = clock() - start
            if spent > READ_SLICE:
                running = self.tree.engine.running()
                await trio.sleep(spent * (1 / READ_SHARE - 1) if running else 0)
                start = clock()
        return b"".join(parts)

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        # As sysfs: each write() is one whole value, whatever the offset.
        try:
            self.tree.write(self._files[fh].inode, bytes(buf))
        except OSError as e:
            raise _fuse_error(e) from None
        return len(buf)

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self._files.pop(fh, None)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = abi.PAGE_SIZE
        s.f_namemax = 255
        return s


# -- the mount ---------------------------------------------------------------------------


class MountError(RuntimeError):
    """The control filesystem could not be mounted; the device is served without it."""


def _lazy_unmount(path: str) -> None:
    """Detach a mount whatever state its server is in (``umount -l``, else ``fusermount3 -u -z``)."""
    errors = []
    for cmd in (["umount", "-l", path], ["fusermount3", "-u", "-z", path]):
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            errors.append(f"{cmd[0]}: {e}")
            continue
        if result.returncode == 0:
            return
        errors.append(f"{cmd[0]}: {result.stderr.strip()}")
    raise MountError(f"cannot unmount the stale mount at {path}: {'; '.join(errors)}")


def _makedirs(path: str) -> None:
    """Create ``path`` and missing parents with mode 0755 (not the umask's), so any user can reach the files."""
    parent = os.path.dirname(path)
    if parent and parent != path and not os.path.isdir(parent):
        _makedirs(parent)
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        return
    os.chmod(path, 0o755)


def prepare_mountpoint(path: str) -> None:
    """Make ``path`` ready to mount on: create it, or clear a crashed daemon's mount from it.

    A FUSE mount whose server died stays in the mount table, and every
    access to it fails with ENOTCONN; it is unmounted lazily (one log
    line).  A *live* mount there (another daemon serving the same
    directory) is left alone: mounting over it would hide it.
    """
    try:
        os.stat(path)
    except FileNotFoundError:
        _makedirs(path)
        return
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise MountError(f"{path}: {e.strerror}") from None
        log.info("%s: clearing the stale mount of a daemon that died (ENOTCONN)", path)
        _lazy_unmount(path)
        if not os.path.exists(path):
            _makedirs(path)
        return
    if os.path.ismount(path):
        raise MountError(f"{path} is already a mount point (another cuse-ksm daemon?); not mounting over it")
    if not os.path.isdir(path):
        raise MountError(f"{path} is not a directory")


def mount_options() -> set[str]:
    """allow_other so any user may read (the files' modes decide who writes); fsname names us in the mount table."""
    return {*pyfuse3.default_options, "allow_other", "fsname=cuse-ksm"}


async def serve(tree: ControlTree, mountpoint: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Mount the control filesystem at ``mountpoint``, showing ``tree``, and serve it until cancelled.

    Reports started once the mount is in place.  Raises MountError (before
    starting, so ``nursery.start`` raises it as it is, on every trio, and the
    daemon can go on without its control files) if it cannot mount.  pyfuse3
    keeps one global session per process, so one control filesystem per
    process.

    The unmount happens in a ``finally``, which runs whatever ends the
    serving: cancellation, a crash elsewhere in the daemon's nursery, or an
    error in the filesystem itself.  Nothing here catches by exception type,
    because ``pyfuse3.main`` runs its workers in a nursery of its own: on a
    trio with strict exception groups a handler's error leaves it as an
    ExceptionGroup, on older trios as the bare exception.  Either way it is
    passed on unchanged (the daemon's nursery reports it) after the mount is
    gone; closing the FUSE channel makes the kernel fail the requests still
    waiting for an answer (ECONNABORTED, or ENOTCONN) instead of leaving
    their callers hung.
    """
    mountpoint = os.path.abspath(mountpoint)
    prepare_mountpoint(mountpoint)
    ops = ControlOperations(tree)
    try:
        pyfuse3.init(ops, mountpoint, mount_options())
    except RuntimeError as e:
        if "fuse_session_mount" in str(e):
            pyfuse3.close(unmount=False)  # the session exists; free it
        raise MountError(f"cannot mount the control filesystem at {mountpoint}: {e}") from None
    try:
        log.info("control files at %s", mountpoint)
        task_status.started()
        await pyfuse3.main()
        # main() returns only when the kernel ended the session: someone
        # unmounted us.  The device goes on without its control files.
        log.warning("%s was unmounted from outside; control files gone until the daemon restarts", mountpoint)
    finally:
        # Detaches the mount (lazily: a reader still inside it does not keep
        # it) and closes the FUSE channel, which aborts pending requests.
        pyfuse3.close(unmount=True)
