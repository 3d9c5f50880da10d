"""Command line: ``cuse-ksm`` runs the daemon in the foreground."""

from __future__ import annotations

import argparse
import grp
import logging
import os
import signal
import sys

import trio

from cuse_ksm import __version__
from cuse_ksm.daemon import NoCuseError, NodeAccess, Server, open_cuse_channel
from cuse_ksm.device import KsmDevice
from cuse_ksm.engine import Engine
from cuse_ksm.host.procmem import ProcessMemory

log = logging.getLogger("cuse_ksm")


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
    return p


async def run_daemon(args: argparse.Namespace) -> None:
    channel = open_cuse_channel(args.cuse)
    try:
        engine = Engine()
        device = KsmDevice(engine, ProcessMemory.open)
        server = Server(channel, device, devname=args.name, access=NodeAccess(args.mode, args.group))
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("%s: shutting down", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return

            async def serve() -> None:
                await server.serve()
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            nursery.start_soon(serve)
    finally:
        # Closing the channel makes the kernel tear the device node down.
        os.close(channel)
        for sma in list(engine.smas.values()):
            engine.release_sma(sma)
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(), format="cuse-ksm: %(levelname)s: %(message)s")
    try:
        trio.run(run_daemon, args)
    except NoCuseError as e:
        log.error("%s", e)
        return 2
    except PermissionError as e:
        log.error("%s: the daemon must run as root (it opens /dev/cuse and other processes' memory)", e)
        return 2
    return 0
