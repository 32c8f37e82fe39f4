"""A Ray instance that sae-seeds starts listens on loopback only (ray.bind_address, 127.0.0.1 by default)."""

import ipaddress
import os
import subprocess
import sys
import time

import psutil

from .conftest import REPO, TINY

# A driver that starts Ray the way `sae-seeds run` does, runs a task and an actor (worker processes listen too),
# says so, and keeps everything up until its stdin closes.
DRIVER = """
import sys, ray
from orchestrator.config import load_config
from orchestrator.pipeline import ray_session

@ray.remote
class Echo:
    def ping(self):
        return 1

with ray_session(load_config(sys.argv[1], sys.argv[2:]), log_to_driver=False):
    assert ray.get(ray.remote(lambda: 1).remote()) == 1 and ray.get(Echo.remote().ping.remote()) == 1
    print("up", flush=True)
    sys.stdin.read()
"""


def listening(root: psutil.Process) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP listener and UDP socket of `root` and its descendants."""
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr):  # listening TCP, bound UDP
                    found.append((proc.name(), c.laddr.ip, c.laddr.port))
        except psutil.Error:  # exited meanwhile
            pass
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_a_local_ray_instance_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(TINY), "ray.num_cpus=2"], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env | {"PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "up", proc.stderr.read()[-3000:]
        time.sleep(2)  # agents finish binding
        sockets = listening(psutil.Process(proc.pid))
    finally:
        proc.stdin.close()
        proc.wait(timeout=120)
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the listeners were found at all
    assert any(n.startswith("ray::") for n in names), sockets  # workers and agents too
    exposed = [s for s in sockets if not is_loopback(s[1])]
    assert exposed == [], exposed
