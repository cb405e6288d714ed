"""A free TCP port for a test's rendezvous: asked of the kernel (bind to port 0), not derived from the pid, so
concurrent pytest sessions on one machine do not pick the same one."""

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
