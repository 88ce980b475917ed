"""Cut a process off the network, keeping loopback, for tests that must show
that something works offline.

``cut_network()`` first puts the process in a new network namespace (as
root: ``unshare(CLONE_NEWNET)``; otherwise inside a new user namespace, where
it may), whose only interface is loopback, brought up here: nothing but
127.0.0.1 can be reached, by any code, Python or not, in this process and
every process it starts. Where the kernel refuses both (some containers), it
falls back to ``install_socket_guard()``: Python's socket calls refuse every
address that is not loopback, in this process and, through a
``sitecustomize`` module on ``PYTHONPATH``, in the Python processes it
starts (code that opens sockets outside Python is not covered then).
``probe()`` checks the result either way.

The namespace is entered with ``unshare(2)`` through ctypes (Python 3.11 has
no ``os.unshare``) and loopback is brought up with the ``SIOCSIFFLAGS``
ioctl, so neither util-linux's ``unshare`` nor iproute2's ``ip`` is needed.
A new user namespace needs a single-threaded process: call this first.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import os
import socket
import struct
import tempfile
from pathlib import Path

__all__ = ["GUARD_MESSAGE", "cut_network", "install_socket_guard", "probe"]

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
GUARD_MESSAGE = "network access is disabled in this test (only loopback is allowed)"


def _unshare(flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _enter_user_and_network_namespace() -> None:
    uid, gid = os.getuid(), os.getgid()
    _unshare(CLONE_NEWUSER | CLONE_NEWNET)
    # Map ourselves to root inside, so that files are still made as our user
    # and we may configure the new namespace's loopback.
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")


def cut_network() -> str:
    """Cut the network off; returns how: "network namespace", "user and
    network namespace" or "socket guard"."""
    try:
        _unshare(CLONE_NEWNET)
        how = "network namespace"
    except OSError:
        try:
            _enter_user_and_network_namespace()
            how = "user and network namespace"
        except OSError:
            install_socket_guard(children=True)
            return "socket guard"
    _loopback_up()
    return how


def _loopback_host(host: object) -> bool:
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _checked(address: object) -> None:
    host = address[0] if isinstance(address, tuple) else None
    if isinstance(address, tuple) and not _loopback_host(host):
        raise PermissionError(errno.EACCES, f"{GUARD_MESSAGE}: {host}")


def install_socket_guard(*, children: bool = False) -> None:
    """Refuse every non-loopback address in Python's socket calls; with
    ``children``, in the Python processes started from here on too."""
    if getattr(socket, "_crossguard_offline", False):
        return
    connect, connect_ex, sendto, getaddrinfo = (
        socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto, socket.getaddrinfo,
    )  # fmt: skip

    def guarded_connect(self, address):
        _checked(address)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        _checked(address)
        return connect_ex(self, address)

    def guarded_sendto(self, data, *args):
        _checked(args[-1])
        return sendto(self, data, *args)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not _loopback_host(host.decode() if isinstance(host, bytes) else host):
            raise socket.gaierror(socket.EAI_NONAME, f"{GUARD_MESSAGE}: {host}")
        return getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto = (
        guarded_connect, guarded_connect_ex, guarded_sendto,
    )  # fmt: skip
    socket.getaddrinfo = guarded_getaddrinfo
    socket._crossguard_offline = True
    if children:
        folder = Path(tempfile.mkdtemp(prefix="crossguard-offline-"))
        (folder / "sitecustomize.py").write_text("from tests.offline import install_socket_guard\n"
                                                 "install_socket_guard()\n")  # fmt: skip
        root = str(Path(__file__).resolve().parent.parent)
        paths = [str(folder), root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        os.environ["PYTHONPATH"] = os.pathsep.join(paths)


def probe() -> dict[str, str]:
    """What reaching out gives now: a documentation address (192.0.2.1, which
    no network routes) and a hub name must fail at once; loopback must work."""
    result = {}
    try:
        socket.create_connection(("192.0.2.1", 80), timeout=5).close()
        result["outside"] = "connected"
    except TimeoutError:
        result["outside"] = "timed out (a route exists: not cut off)"
    except OSError as error:
        result["outside"] = f"refused: {error}"
    try:
        socket.getaddrinfo("huggingface.co", 443)
        result["dns"] = "resolved"
    except OSError as error:
        result["dns"] = f"refused: {error}"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=5):
            result["loopback"] = "connected"
    return result
