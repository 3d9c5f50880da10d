"""The control filesystem: the engine's counters and knobs as files, like /sys/kernel/mm/ksm.

The 2009 driver had no sysfs directory (its reviewers asked for one; the v4
patch and later kernels added it), so a 2009 program can only steer the
scanner through START_STOP_KTHREAD.  An administrator wants what later
kernels give: ``cat pages_sharing``, ``echo 100 > pages_to_scan``.  The
daemon mounts this filesystem (pyfuse3, FUSE) at ``/run/cuse-ksm/<device
name>`` and serves it from the same trio loop as the device, so a file read
sees exactly the state the ioctls see and change, with no locking.

Three layers, each usable without the next:

* :data:`VALUES`, the table: each file name with its getter and, for the
  read-write ones, its setter over an :class:`~cuse_ksm.engine.Engine`.
  :func:`read_value` and :func:`write_value` add the text format (one
  number and a newline) and the refusal of bad writes (EINVAL, nothing
  changed).
* :class:`ControlTree`: the directory tree (the values, plus ``processes/``
  with a directory per registered process) as inode numbers, names, modes and
  contents.  Pure, unit-testable.
* :class:`ControlOperations` and :func:`serve`: the pyfuse3 adapter and the
  mount's lifetime (stale mounts of a crashed daemon are cleared first; the
  mount goes away when the task ends, however it ends).

Writes act on the engine exactly as START_STOP_KTHREAD does: the new
parameters are built as an :class:`~cuse_ksm.abi.KthreadInfo` (which refuses
values that do not fit its ``__u32`` fields) and stored with
:meth:`Engine.set_kthread`, which wakes the scanner.  One deliberate
difference from the ioctl: writing 1 to ``run`` while ``pages_to_scan`` is 0
is accepted and stored (later kernels do the same), whereas the 2009 ioctl
returns +1 and changes nothing; the scanner stays idle either way, since it
only scans while the run flag is set *and* pages_to_scan is not 0.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from cuse_ksm import abi
from cuse_ksm.engine import Engine, Slot

log = logging.getLogger("cuse_ksm")

DEFAULT_ROOT = "/run/cuse-ksm"

# Longest write we parse: a 20-digit u64 plus a newline fits with room to spare.
MAX_WRITE = 64


def default_dir(devname: str) -> str:
    """Where the daemon serving /dev/NAME mounts its control files: /run/cuse-ksm/NAME.

    One directory per device name, so that a second daemon (another
    ``--name``) does not collide with the first.
    """
    return os.path.join(DEFAULT_ROOT, devname)


# -- the table of values ------------------------------------------------------------


def parse_number(data: bytes) -> int:
    """The number in a write: decimal ASCII digits, surrounding whitespace (``echo``'s newline) ignored.

    Anything else (a sign, hex, a second word, an empty write) is a
    ValueError, which the filesystem turns into EINVAL.
    """
    text = data.strip()
    if not text or not text.isdigit():  # bytes.isdigit is ASCII-only: no '+', '-', '٣'
        raise ValueError(f"{data[:MAX_WRITE]!r} is not a decimal number")
    return int(text)


def _store_kthread(engine: Engine, **changes: int) -> None:
    """Change some kthread parameters, keeping the others: the ioctl's own path.

    ``dataclasses.replace`` builds a new KthreadInfo, whose range check runs
    before anything is stored; then :meth:`Engine.set_kthread` stores it and
    wakes the scanner, as KSM_START_STOP_KTHREAD does.
    """
    info = dataclasses.replace(engine.kthread, **changes)
    engine.set_kthread(info.sleep, info.pages_to_scan, info.flags)


def _set_run(engine: Engine, value: int) -> None:
    # Later kernels also take 2 (unmerge everything); the 2009 driver has no
    # such operation, so 2 is refused like any other value.
    if value not in (0, 1):
        raise ValueError(f"run must be 0 or 1, not {value} (2, unmerge, is not part of the 2009 driver)")
    flags = engine.kthread.flags & ~abi.KSM_CONTROL_FLAGS_RUN
    _store_kthread(engine, flags=flags | (abi.KSM_CONTROL_FLAGS_RUN if value else 0))


def _set_sleep_millisecs(engine: Engine, value: int) -> None:
    if value * 1000 > abi.U32_MAX:
        raise ValueError(f"sleep_millisecs {value} is too large: sleep is a __u32 number of microseconds")
    _store_kthread(engine, sleep=value * 1000)


def _set_max_kernel_pages(engine: Engine, value: int) -> None:
    if value > abi.U64_MAX:  # the v4 patch's unsigned long
        raise ValueError(f"max_kernel_pages {value} does not fit in an unsigned long")
    engine.max_kernel_pages = value


@dataclass(frozen=True)
class Value:
    """One file of the control directory: a number read from (and maybe written to) the engine."""

    name: str
    get: Callable[[Engine], int]
    set: Callable[[Engine, int], None] | None
    doc: str

    @property
    def writable(self) -> bool:
        return self.set is not None


VALUES: tuple[Value, ...] = (
    Value(
        "run",
        lambda e: e.kthread.flags & abi.KSM_CONTROL_FLAGS_RUN,
        _set_run,
        "1 while the run flag is set, 0 when stopped (flags bit 0 of GET_INFO_KTHREAD)",
    ),
    Value(
        "sleep",
        lambda e: e.kthread.sleep,
        lambda e, v: _store_kthread(e, sleep=v),
        "microseconds between two rounds (the 2009 struct's unit)",
    ),
    Value(
        "sleep_millisecs",
        lambda e: e.kthread.sleep // 1000,
        _set_sleep_millisecs,
        "the same pause in milliseconds, as later kernels show it (rounded down)",
    ),
    Value(
        "pages_to_scan",
        lambda e: e.kthread.pages_to_scan,
        lambda e, v: _store_kthread(e, pages_to_scan=v),
        "pages scanned per round",
    ),
    Value(
        "max_kernel_pages",
        lambda e: e.max_kernel_pages,
        _set_max_kernel_pages,
        "limit on shared pages, 0 = none",
    ),
    Value("kernel_pages_allocated", lambda e: e.counters().kernel_pages_allocated, None, "the v4 name of pages_shared"),
    Value("pages_shared", lambda e: e.counters().pages_shared, None, "shared pages in use"),
    Value("pages_sharing", lambda e: e.counters().pages_sharing, None, "more sites mapping them: pages saved"),
    Value("pages_unshared", lambda e: e.counters().pages_unshared, None, "pages unique so far"),
    Value("pages_volatile", lambda e: e.counters().pages_volatile, None, "pages changing too fast to merge"),
    Value("full_scans", lambda e: e.counters().full_scans, None, "completed passes over all registered memory"),
    Value("pages_scanned", lambda e: e.counters().pages_scanned, None, "pages looked at since start"),
)
BY_NAME: dict[str, Value] = {v.name: v for v in VALUES}


def read_value(engine: Engine, name: str) -> bytes:
    """The contents of file ``name``: one number and a newline."""
    return b"%d\n" % BY_NAME[name].get(engine)


def write_value(engine: Engine, name: str, data: bytes) -> None:
    """Apply a write to file ``name``, or raise OSError and change nothing.

    EACCES for a read-only value, EINVAL for text that is not a number or a
    number out of the value's range (the same rule as the struct's fields).
    """
    value = BY_NAME[name]
    if value.set is None:
        raise OSError(errno.EACCES, f"{name} is read-only")
    try:
        if len(data) > MAX_WRITE:
            raise ValueError(f"a write of {len(data)} bytes is no number of ours")
        value.set(engine, parse_number(data))
    except ValueError as e:
        raise OSError(errno.EINVAL, f"{name}: {e}") from None


# -- the per-process figures -------------------------------------------------------------


def slots_by_tgid(engine: Engine) -> dict[int, list[Slot]]:
    """Registered regions grouped by the process whose memory they name, in registration order."""
    out: dict[int, list[Slot]] = {}
    for slot in engine.slots:
        out.setdefault(slot.space.tgid, []).append(slot)
    return out


REGIONS_HEADER = "sma addr npages merged\n"


def regions_text(slots: list[Slot]) -> bytes:
    """``processes/<pid>/regions``: a header line, then one line per region.

    ``merged`` counts the region's pages that currently map a shared page.
    """
    lines = [REGIONS_HEADER]
    lines += [f"{s.sma.id} {s.addr:#x} {s.npages} {s.pages_merged}\n" for s in slots]
    return "".join(lines).encode()


# -- the tree --------------------------------------------------------------------------

ROOT_INODE = int(pyfuse3.ROOT_INODE)
PROCESSES_INODE = 2
_VALUE_INODES = {v.name: 16 + i for i, v in enumerate(VALUES)}
_INODE_VALUES = {ino: BY_NAME[name] for name, ino in _VALUE_INODES.items()}
# Per-process inodes are computed from the tgid, so they need no table and
# stay valid for as long as the process is registered.
_PROC_BASE = 1 << 32
_PROC_STRIDE = 4
PROCESS_FILES = ("ksm_merging_pages", "regions")


@dataclass(frozen=True)
class Node:
    """What the filesystem shows for one inode."""

    inode: int
    mode: int  # type and permission bits

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


_DIR_MODE = stat.S_IFDIR | 0o755
_RW_MODE = stat.S_IFREG | 0o644
_RO_MODE = stat.S_IFREG | 0o444


class ControlTree:
    """The directory tree over one engine: names, inodes, modes and contents, computed on demand.

    Nothing is cached: every lookup and read asks the engine, so a process
    directory appears with its first REGISTER and vanishes with its last
    REMOVE.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # inode layout ---------------------------------------------------------------

    @staticmethod
    def process_inode(tgid: int, index: int = -1) -> int:
        """The directory of ``tgid`` (index -1) or its file ``PROCESS_FILES[index]``."""
        return _PROC_BASE + tgid * _PROC_STRIDE + 1 + index

    @staticmethod
    def _split_process_inode(inode: int) -> tuple[int, int]:
        tgid, k = divmod(inode - _PROC_BASE, _PROC_STRIDE)
        return tgid, k - 1

    def node(self, inode: int) -> Node | None:
        """The node behind ``inode``, or None if it does not exist (any more)."""
        if inode in (ROOT_INODE, PROCESSES_INODE):
            return Node(inode, _DIR_MODE)
        value = _INODE_VALUES.get(inode)
        if value is not None:
            return Node(inode, _RW_MODE if value.writable else _RO_MODE)
        if inode >= _PROC_BASE:
            tgid, k = self._split_process_inode(inode)
            if k < len(PROCESS_FILES) and tgid in slots_by_tgid(self.engine):
                return Node(inode, _DIR_MODE if k == -1 else _RO_MODE)
        return None

    def entries(self, inode: int) -> list[tuple[str, int]]:
        """(name, inode) of the children of directory ``inode``, in a stable order."""
        if inode == ROOT_INODE:
            return [(v.name, _VALUE_INODES[v.name]) for v in VALUES] + [("processes", PROCESSES_INODE)]
        if inode == PROCESSES_INODE:
            return [(str(tgid), self.process_inode(tgid)) for tgid in sorted(slots_by_tgid(self.engine))]
        node = self.node(inode)
        if node is not None and node.is_dir:
            tgid, _ = self._split_process_inode(inode)
            return [(name, self.process_inode(tgid, k)) for k, name in enumerate(PROCESS_FILES)]
        raise OSError(errno.ENOTDIR, "not a directory")

    def lookup(self, parent: int, name: str) -> int | None:
        for child, inode in self.entries(parent):
            if child == name:
                return inode
        return None

    def path(self, path: str) -> int | None:
        """The inode at a relative path such as ``processes/42/regions`` (tests, tools)."""
        inode: int | None = ROOT_INODE
        for part in filter(None, path.split("/")):
            if inode is None:
                return None
            inode = self.lookup(inode, part)
        return inode

    # contents -----------------------------------------------------------------

    def read(self, inode: int) -> bytes:
        value = _INODE_VALUES.get(inode)
        if value is not None:
            return read_value(self.engine, value.name)
        node = self.node(inode)
        if node is None:
            raise OSError(errno.ENOENT, "no such file")
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        tgid, k = self._split_process_inode(inode)
        slots = slots_by_tgid(self.engine).get(tgid, [])
        if PROCESS_FILES[k] == "ksm_merging_pages":
            return b"%d\n" % sum(s.pages_merged for s in slots)
        return regions_text(slots)

    def write(self, inode: int, data: bytes) -> None:
        value = _INODE_VALUES.get(inode)
        if value is None:
            raise OSError(errno.EACCES, "read-only")
        write_value(self.engine, value.name, data)


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
                f.snapshot = self.tree.read(f.inode)
            except OSError as e:
                raise _fuse_error(e) from None
        return f.snapshot[off : off + size]

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


async def serve(engine: Engine, mountpoint: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Mount the control filesystem at ``mountpoint`` and serve it until cancelled.

    Reports started once the mount is in place.  Raises MountError (before
    starting) if it cannot mount.  pyfuse3 keeps one global session per
    process, so one control filesystem per process.  The unmount happens in
    a ``finally``: cancellation, a crash elsewhere in the daemon's nursery,
    or an error in the filesystem itself all leave no mount behind.
    """
    mountpoint = os.path.abspath(mountpoint)
    prepare_mountpoint(mountpoint)
    ops = ControlOperations(ControlTree(engine))
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
        pyfuse3.close(unmount=True)
