"""Command line: ``cuse-ksm [options]`` runs the daemon in the foreground; ``cuse-ksm status`` reports.

The daemon is the default (no subcommand), so ``python -m cuse_ksm`` and old
service files keep working; ``status`` and ``pages`` are the subcommands.

This is where the daemon is put together (:func:`run_daemon`), and the only
place: every other module gets what it works with passed in, so the OS
adapters (``host.procmem`` for callers' memory, ``host.ptrace`` for borrowing
a caller's thread) are chosen here and nowhere else.
"""

from __future__ import annotations

import argparse
import functools
import grp
import logging
import os
import resource
import signal
import sys
from collections.abc import Awaitable, Callable

import trio

from cuse_ksm import __version__, abi, controltree, kksmd, pages, status, trace
from cuse_ksm.daemon import NoCuseError, Server, open_cuse_channel
from cuse_ksm.device import HostView, KsmDevice
from cuse_ksm.engine import Engine
from cuse_ksm.host import hostksm, procfs, ptrace, uring
from cuse_ksm.host.procmem import ProcessMemory
from cuse_ksm.session import CuseSession, NodeAccess

log = logging.getLogger(__name__)

# The request loop to run the server with: Server.serve, or a measuring
# instrument's own loop built from the Server's public parts
# (bench/cuse_c/floor_server.py).
ServeLoop = Callable[[Server], Awaitable[None]]


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 0660") from None
    if not 0 <= mode <= 0o7777:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range")
    return mode


def _group(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no group named {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cuse-ksm",
        description="Emulate the 2009 /dev/ksm driver (Kernel Samepage Merging) through CUSE.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--name", default="ksm", help="device name under /dev (default: ksm)")
    p.add_argument("--mode", type=_mode, help="octal mode of the device node, e.g. 0660 (default: the kernel's, 0600)")
    p.add_argument("--group", type=_group, help="group of the device node, e.g. kvm (default: root)")
    p.add_argument("--cuse", default="/dev/cuse", help="the CUSE channel (default: /dev/cuse)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="default: info")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--stats-dir",
        metavar="DIR",
        help=f"where to mount the control files (default: {controltree.DEFAULT_ROOT}/NAME, NAME from --name)",
    )
    where.add_argument(
        "--no-stats-dir",
        dest="stats_dir",
        action="store_const",
        const="",
        help="do not mount the control files",
    )
    p.add_argument(
        "--merge",
        choices=["emulate", "kernel"],
        default="emulate",
        help="emulate (default): scan and count as the 2009 driver, sharing nothing; "
        "kernel: also have the host kernel's KSM really merge what is registered "
        "(madvise in the caller; START_STOP drives /sys/kernel/mm/ksm, restored at exit)",
    )
    p.add_argument(
        "--cross-check",
        action="store_true",
        help="with --merge kernel, run the emulated scanner too, so that the 2009 counters stay live beside "
        "the kernel's (it costs a CPU while ksmd merges; off, they stay at 0)",
    )
    p.add_argument(
        "--trace",
        action="store_true",
        help="log every ioctl as strace would show it: caller, file, request, struct, result, time",
    )
    p.add_argument(
        "--stats-interval",
        type=float,
        default=0,
        metavar="SECONDS",
        help="log the scanner's counters every SECONDS (default: 0, never)",
    )
    sub = p.add_subparsers(dest="command", metavar="{status,pages}", title="subcommand (default: run the daemon)")
    st = sub.add_parser(
        "status",
        help="print the counters from the control files",
        description="Print the KSM counters and the memory saved, read from the daemon's control files.",
    )
    status.add_arguments(st)
    pg = sub.add_parser(
        "pages",
        help="why a process's pages are merged or not, page by page",
        description="Count a process's registered pages by state (merged, unstable, volatile, ...), from the "
        "daemon's control files; -v lists the address ranges, --map draws them.",
    )
    pages.add_arguments(pg)
    return p


async def log_counters(engine: Engine, interval: float) -> None:
    """One line of counters every ``interval`` seconds, for watching the scanner from a terminal."""
    while True:
        await trio.sleep(interval)
        c = engine.counters()
        log.info(
            "pages_shared %d pages_sharing %d pages_unshared %d pages_volatile %d full_scans %d pages_scanned %d",
            c.pages_shared,
            c.pages_sharing,
            c.pages_unshared,
            c.pages_volatile,
            c.full_scans,
            c.pages_scanned,
        )


def follow_on_host(engine: Engine, host_ksm: hostksm.HostKsm) -> Callable[[], None]:
    """Kernel mode: each new scanner setting (START_STOP_KTHREAD, the control files) goes to the host's ksmd too.

    Returns the undo.  A stop only stops (HostKsm.stop).  A value the host
    refuses is logged, not raised: the ioctl that set it has returned
    already, as the 2009 driver's would.
    """

    def follow(params: bool) -> None:
        if not params:
            return
        k = engine.kthread
        try:
            if k.flags & abi.KSM_CONTROL_FLAGS_RUN:
                host_ksm.apply(True, k.pages_to_scan, k.sleep)
            else:
                host_ksm.stop()
        except OSError as e:
            log.error("could not pass the new scanner settings to the host kernel: %s", e)

    return engine.watch(follow)


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one, and return it.

    Every registered region pins three fds of its process (pidfd, pagemap,
    mem: host/procmem.py), so the usual soft limit of 1024 would refuse
    the 342nd REGISTER with EMFILE.  The daemon never calls select(), the
    one reason to keep fds below 1024.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def run_daemon(args: argparse.Namespace, serve_loop: ServeLoop = Server.serve) -> None:
    # Checked first: kernel mode on a host without KSM refuses to start at all.
    host_ksm = hostksm.HostKsm.open() if args.merge == "kernel" else None
    channel = open_cuse_channel(args.cuse)
    try:
        engine = Engine()
        host = None
        if host_ksm is not None:
            host = HostView(
                procfs.tgid,
                hostksm.mergeable_pages,
                hostksm.merging_pages,
                host_ksm.counters,
                host_ksm.general_profit,
                hostksm.ksm_stat,
            )
            found = " ".join(f"{k}={v}" for k, v in host_ksm.save().items())
            follow_on_host(engine, host_ksm)
            # Logged so that an administrator can put them back after a kill -9.
            log.info("merging for real through the host kernel's KSM; its settings now: %s (restored at exit)", found)
        device = KsmDevice(engine, ProcessMemory.open, host=host)
        session = CuseSession(device, devname=args.name, access=NodeAccess(args.mode, args.group), trace=args.trace)
        server = Server(channel, session, ptrace.borrow_from_ioctl)
        stats_dir = controltree.default_dir(args.name) if args.stats_dir is None else args.stats_dir
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("%s: shutting down", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return

            async def serve() -> None:
                await serve_loop(server)
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            if host_ksm is None or args.cross_check:
                # In kernel mode the host's ksmd does the merging; our scanner
                # would only recount it, at the cost of a whole CPU taken from
                # ksmd (docs/benchmarks.md, "Really merging").
                # The ring the scanner reads ahead through is made now, so
                # that its fd is one of the daemon's from the start.
                if uring.ring() is None:
                    log.info("io_uring is not available: the scanner copies every page itself, on one CPU")
                await nursery.start(functools.partial(kksmd.run, engine, pending=server.waiting))
            if stats_dir:
                # Imported here: pyfuse3 (libfuse3) is needed only by a daemon that mounts.
                from cuse_ksm import controlfs

                try:
                    tree = controltree.ControlTree(engine, host, cross_check=args.cross_check)
                    await nursery.start(controlfs.serve, tree, stats_dir)
                except controlfs.MountError as e:
                    # The device matters more than its statistics: serve it anyway.
                    log.error("%s; running without control files", e)
            if args.stats_interval > 0:
                nursery.start_soon(log_counters, engine, args.stats_interval)
            nursery.start_soon(serve)
    finally:
        # Closing the channel makes the kernel tear the device node down.
        os.close(channel)
        for sma in list(engine.smas.values()):
            engine.release_sma(sma)
        if host_ksm is not None:
            # Every exit path but SIGKILL comes through here (README, "Really merging").
            restored = host_ksm.restore()
            if restored:
                log.info("host KSM settings restored: %s", " ".join(f"{k}={v}" for k, v in restored.items()))
    log.info("stopped")


def main(argv: list[str] | None = None, *, serve_loop: ServeLoop = Server.serve) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None and args.cross_check and args.merge != "kernel":
        parser.error("--cross-check goes with --merge kernel (in emulation the scanner always runs)")
    if args.command == "status":
        return status.run(args)
    if args.command == "pages":
        return pages.run(args)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(), format="cuse-ksm: %(levelname)s: %(message)s")
    if args.trace:
        # Its own level: --trace shows even with --log-level warning.
        trace.log.setLevel(logging.INFO)
    log.debug("open files limit: %d", raise_fd_limit())
    rc = 0
    # except*: the daemon's tasks run in nurseries, which raise what fails in
    # them inside an ExceptionGroup; a bare exception matches too.
    try:
        trio.run(run_daemon, args, serve_loop)
    except* (NoCuseError, hostksm.NoHostKsm) as cannot:
        for e in cannot.exceptions:
            log.error("%s", e)
        rc = 2
    except* PermissionError as denied:
        for refusal in denied.exceptions:
            log.error("%s: the daemon must run as root (it opens /dev/cuse and other processes' memory)", refusal)
        rc = 2
    return rc
