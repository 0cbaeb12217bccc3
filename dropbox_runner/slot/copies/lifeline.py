"""The daemon's private Ray instance (`ray_address: local`): `ray start --head --block` in a process
group of its own, ended whole, agents included, as soon as the daemon is gone (its stdin closes,
even after `kill -9`). Prints the head's address once it is up.

`python -m dropbox_runner.slot.copies.lifeline <temp folder>` (started by `ray.ensure_ray`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    port = free_port()
    # every address stays 127.0.0.1; no token: the instance is this daemon's own, on loopback only
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--num-cpus={os.cpu_count() or 1}",
            f"--temp-dir={sys.argv[1]}",  # under the root where the socket paths allow (ray.py)
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=sys.stderr,
    )

    def watch_daemon() -> None:
        sys.stdin.buffer.read()  # returns when the daemon is gone
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch_daemon, daemon=True).start()
    for line in head.stdout:  # "Ray runtime started." once the head is ready for drivers
        if b"Ray runtime started" in line:
            print(f"127.0.0.1:{port}", flush=True)
            break
    for _ in head.stdout:  # keep the pipe drained
        pass
    head.wait()
    os.killpg(0, signal.SIGKILL)
    return 1


if __name__ == "__main__":
    sys.exit(main())
