"""The VM lab for people: `python -m scripts.vmlab COMMAND` (as root).

build [NAME ...] [--with pg:postgresql-15]   build (or find) the cached images: debian12, debian11
boot NAME [--workdir DIR] [--forward HOST_PORT:GUEST_PORT ...]
                                             boot a throwaway clone of an image and attach to its console
console DIR                                  attach to the console of a running lab VM (its directory: the
                                             test's or benchmark's lab dir / VM name); Ctrl-] detaches
list                                         the cached images
sweep                                        undo what killed image builds left (mounts, loop devices)
prune                                        remove cached images of recipes that changed (not in use)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import socket
import sys
import tempfile
import termios
import time
import tty
from pathlib import Path

from scripts.vmlab.build import CACHE, cached, image, prune
from scripts.vmlab.host import VmLabError, exit_on_sigterm, locked, sweep
from scripts.vmlab.lab import Lab
from scripts.vmlab.machine import Forward, Spec
from scripts.vmlab.recipe import GUEST_ADDRESS_OF_HOST, RECIPES, Recipe
from server.process.recovery_vm import accelerator

DETACH = b"\x1d"  # Ctrl-]


def _recipe(name: str, variants: list[str]) -> Recipe:
    if name not in RECIPES:
        raise VmLabError(f"unknown image {name!r} (known: {', '.join(RECIPES)})")
    recipe = RECIPES[name]
    for variant in variants:
        suffix, _, packages = variant.partition(":")
        if not suffix or not packages:
            raise VmLabError(f"--with {variant!r}: expected SUFFIX:PACKAGE[,PACKAGE...]")
        recipe = recipe.with_packages(suffix, *packages.split(","))
    return recipe


def cmd_build(args: argparse.Namespace) -> int:
    for name in args.names or list(RECIPES):
        recipe = _recipe(name, args.variants)
        start = time.monotonic()
        built = image(recipe, progress=lambda line: print(line, flush=True))
        took = time.monotonic() - start
        timings = built.info.get("timings", {})
        print(f"{recipe.name}: {built.disk} ({took:.0f} s now; build took {timings.get('total_s', '?')} s)")
    return 0


def cmd_list(_args: argparse.Namespace) -> int:
    current = {r.cache_name for r in RECIPES.values()}
    for done in sorted(CACHE.glob("*/.complete")):
        info = json.loads((done.parent / "image.json").read_text())
        mark = "current" if done.parent.name in current else "old recipe"
        size = (done.parent / "disk.raw").stat().st_blocks * 512 / (1 << 30)
        print(f"{done.parent.name}  {info['suite']}  kernel {', '.join(info['kernels'])}  {size:.1f} GiB  {mark}")
    return 0


def cmd_sweep(_args: argparse.Namespace) -> int:
    for work in sorted(CACHE.glob("*.build")):
        with locked(CACHE / f"{work.name.removesuffix('.build')}.build.lock", wait=False) as free:
            if not free:
                print(f"{work.name}: being built now, left alone")
                continue
            for undone in sweep(work):
                print(f"{work.name}: {undone}")
            shutil.rmtree(work, ignore_errors=True)
    return 0


def cmd_prune(_args: argparse.Namespace) -> int:
    keep = {r.cache_name for r in RECIPES.values()}
    for name in prune(keep):
        print(f"removed {name}")
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    recipe = _recipe(args.name, args.variants)
    built = cached(recipe) or image(recipe, progress=lambda line: print(line, flush=True))
    forwards = []
    for text in args.forward:
        host, _, guest = text.partition(":")
        if not host.isdigit() or not guest.isdigit():
            raise VmLabError(f"--forward {text!r}: expected HOST_PORT:GUEST_PORT")
        forwards.append(Forward(int(host), int(guest)))
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vmlab-"))
    accel, why = accelerator()
    print(f"accelerator: {accel} ({why}); work directory {workdir}", file=sys.stderr)
    for f in forwards:
        print(f"the guest reaches 127.0.0.1:{f.host_port} at {GUEST_ADDRESS_OF_HOST}:{f.guest_port}", file=sys.stderr)
    with Lab(workdir) as lab:
        vm = lab.vm(args.vm_name, built, Spec(forwards=forwards, hostname=args.vm_name, memory_mib=args.memory))
        lab.start(vm)
        vm.console.close()  # the terminal takes the console over
        print(f"ssh: {' '.join(vm.ssh_argv())}", file=sys.stderr)
        print("console attached; Ctrl-] powers the VM off", file=sys.stderr)
        attach(vm.workdir / "console.sock")
        vm.poweroff()
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    path = Path(args.dir) / "console.sock"
    if not path.exists():
        raise VmLabError(f"{path}: no console socket (is the VM running?)")
    print("console attached (a test that drives this VM waits until you detach); Ctrl-] detaches", file=sys.stderr)
    attach(path)
    return 0


def attach(path: Path) -> None:
    """The terminal on the VM's serial console until Ctrl-] or the VM ends."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        stdin = sys.stdin.fileno()
        saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
        try:
            if saved is not None:
                tty.setraw(stdin)
            sock.sendall(b"\n")
            while True:
                ready, _, _ = select.select([sock, stdin], [], [])
                if sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    os.write(sys.stdout.fileno(), data)
                if stdin in ready:
                    keys = os.read(stdin, 1024)
                    if not keys or DETACH in keys:
                        return
                    sock.sendall(keys)
        finally:
            if saved is not None:
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.vmlab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build (or find) the cached images")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--with", dest="variants", action="append", default=[], metavar="SUFFIX:PACKAGES")
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("boot", help="boot a throwaway clone of an image on this terminal")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--with", dest="variants", action="append", default=[], metavar="SUFFIX:PACKAGES")
    p.add_argument("--workdir", metavar="DIR", help="keep the overlay and logs here (default: a temporary one)")
    p.add_argument("--forward", action="append", default=[], metavar="HOST_PORT:GUEST_PORT")
    p.add_argument("--memory", type=int, default=1024, metavar="MIB")
    p.add_argument("--vm-name", default="vm", metavar="NAME")
    p.set_defaults(func=cmd_boot)
    p = sub.add_parser("console", help="attach to a running lab VM's console")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=cmd_console)
    for name, func, text in (
        ("list", cmd_list, "the cached images"),
        ("sweep", cmd_sweep, "undo what killed image builds left"),
        ("prune", cmd_prune, "remove cached images of changed recipes"),
    ):
        sub.add_parser(name, help=text).set_defaults(func=func)
    args = parser.parse_args(argv)
    exit_on_sigterm()
    if os.geteuid() != 0:
        print("vmlab: needs root (loop devices, mounts, QEMU)", file=sys.stderr)
        return 1
    try:
        return int(args.func(args))
    except VmLabError as e:
        print(f"vmlab: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
