"""A real Ray cluster of `ray start` processes on this machine, isolated from every other Ray here
(helpers for the job-submission and two-node tests; no tests in this module).

Each node is one `ray start --block` process in its own session: its own ``--temp-dir`` (so the
address file other drivers' ``ray.init()`` reads is never touched), its own ports, and token
authentication on with a token of its own (``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN``, never
``~/.ray/auth_token``). Stopping signals only these processes: SIGTERM makes ``ray start --block``
tear down what it started; whatever survives is killed by pid, found by a marker in its
environment (or our temp dir in its command line). A global ``ray stop`` would kill every
cluster on the machine, and other tests run beside us.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(p: psutil.Process) -> bool:
    try:  # is_running() is safe against pid reuse; a zombie is already dead
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass
class Node:
    proc: subprocess.Popen
    log: Path
    head: bool

    def hosts(self, pid: int) -> bool:
        """Whether process ``pid`` runs on this node (a descendant of its `ray start`)."""
        try:
            return any(p.pid == self.proc.pid for p in psutil.Process(pid).parents())
        except psutil.NoSuchProcess:
            return False


class LocalCluster:
    """``with LocalCluster(num_cpus=4) as c:`` a token-authenticated head; ``c.add_node(...)``."""

    def __init__(self, num_cpus: int = 4, object_store_mb: int = 200, env: dict | None = None,
                 resources: dict | None = None):
        # short: Ray's socket paths under it must stay below the 107-byte limit
        self.temp_dir = tempfile.mkdtemp(prefix="lp-ray-", dir="/tmp")
        self.token = secrets.token_hex(32)
        self.object_store = object_store_mb << 20
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                        RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}:{os.environ.get('PATH', '')}",
                        # a test cluster has no traffic to drain: SIGTERM tears down at once
                        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                        RAY_DATA_DISABLE_PROGRESS_BARS="1",
                        PYTHONUNBUFFERED="1", LLAMAPRO_TEST_RAY_CLUSTER=self.temp_dir, **(env or {}))
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.nodes: list[Node] = []
        self._tracked: list[psutil.Process] = []
        try:
            self._start(["--head", "--port", str(self.gcs_port), "--dashboard-port",
                         str(self.dashboard_port), "--include-dashboard", "true",
                         "--ray-client-server-port", str(free_port())], num_cpus, resources)
            self._wait(lambda: self.api("/api/version") and self.alive_nodes(), 300, "the head")
        except TimeoutError as e:
            tail = self.log_tail()
            self.stop()
            raise TimeoutError(f"{e}; its `ray start` log:\n{tail}") from None
        except BaseException:
            self.stop()
            raise

    # --- nodes ---------------------------------------------------------------------------------

    def _start(self, args: list[str], num_cpus: int, resources: dict | None = None,
               env: dict | None = None) -> Node:
        n = len(self.nodes)
        log = Path(self.temp_dir) / f"node-{n}.log"
        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
        # Each node its own temp dir, as on separate machines: nodes sharing one would share
        # runtime_resources/, and a node setting up a job's working_dir for the first time
        # deletes and re-extracts it (overwrite=True), under the feet of the driver running there.
        temp_dir = self.temp_dir if not self.nodes else os.path.join(self.temp_dir, f"n{n}")
        cmd = [str(BIN / "ray"), "start", "--block", "--temp-dir", temp_dir, "--disable-usage-stats",
               "--num-cpus", str(num_cpus), "--object-store-memory", str(self.object_store),
               *args, *[x for p in ports for x in (p, str(free_port()))]]
        if resources:
            cmd += ["--resources", json.dumps(resources)]
        with open(log, "w") as f:  # the child holds its own descriptor
            proc = subprocess.Popen(cmd, env={**self.env, **(env or {})}, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.temp_dir)
        node = Node(proc, log, head=not self.nodes)
        self.nodes.append(node)
        return node

    def add_node(self, num_cpus: int, resources: dict | None = None, timeout: float = 240,
                 env: dict | None = None, wait: bool = True) -> Node:
        """Start a worker node (`ray start --address`) and wait until the cluster counts it.
        ``env`` adds to this node's environment (its workers inherit it). ``wait=False`` returns
        once its `ray start` runs (it joins while the caller goes on, e.g. a replacement node
        booting while the cluster notices the failure it replaces)."""
        known = {n["node_id"] for n in self.alive_nodes()}  # (a just-killed node may still count)
        node = self._start(["--address", self.gcs_address], num_cpus, resources, env)
        if not wait:
            return node
        try:
            self._wait(lambda: {n["node_id"] for n in self.alive_nodes()} - known, timeout,
                       "the new node")
        except TimeoutError as e:
            state = "runs" if node.proc.poll() is None else f"exited {node.proc.returncode}"
            alive = [n["node_id"][:8] for n in self.alive_nodes()]
            raise TimeoutError(f"{e}; alive {alive}, known {[k[:8] for k in known]}, its `ray start` "
                               f"{state}:\n{node.log.read_text()[-3000:]}") from None
        return node

    def kill_node(self, node: Node) -> None:
        """A node failure: SIGKILL its `ray start` and every process below it (raylet, agents,
        and the workers, which run in sessions of their own)."""
        assert not node.head, "killing the head ends the cluster"
        pids = [p.pid for p in psutil.Process(node.proc.pid).children(recursive=True)]
        for pid in [node.proc.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop only this cluster: workers first, then the head; then kill whatever of ours is
        left (a worker that outlived its raylet)."""
        self._tracked = [p for node in self.nodes for p in _tree(node.proc.pid)]
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        for node in self.nodes:
            try:
                node.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(node.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                node.proc.wait(timeout=30)
        left = self.leftovers()
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def leftovers(self) -> list[psutil.Process]:
        """Live processes of this cluster: those below our `ray start`s when we stopped them, and
        any other process whose environment carries our marker. (Processes that set their title,
        such as ray::IDLE or the dashboard's modules, hide both their environment and command line,
        hence the tree.)"""
        out = [p for p in self._tracked if _alive(p)]
        for p in psutil.process_iter(["cmdline"]):
            if p in out:
                continue
            try:
                if p.pid != os.getpid() and _alive(p) and (
                        self.temp_dir in " ".join(p.info["cmdline"] or [])
                        or p.environ().get("LLAMAPRO_TEST_RAY_CLUSTER") == self.temp_dir):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # --- talking to it -------------------------------------------------------------------------

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_header(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def api(self, path: str):
        req = urllib.request.Request(self.dashboard_url + path, headers=self.auth_header)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def alive_nodes(self) -> list[dict]:
        try:
            res = self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        except (OSError, ValueError, KeyError, TypeError):  # the State API is busy (a node just died)
            return []
        return [n for n in res if n["state"] == "ALIVE"]

    def job_client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=self.auth_header)

    def cli(self, *args: str, timeout: float = 600, env: dict | None = None):
        """Run a `ray` CLI command as a user would: RAY_AUTH_MODE=token + the token in the env."""
        return subprocess.run([str(BIN / "ray"), *args], env={**self.env, **(env or {})}, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def log_tail(self, n: int = 3000) -> str:
        return "\n".join(f"--- {node.log.name}\n{node.log.read_text()[-n:]}" for node in self.nodes)

    @staticmethod
    def _wait(ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if ok():
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{what} did not come up within {timeout:.0f}s")


def wait_job(client, job_id: str, timeout: float = 600) -> str:
    """Poll a job until it ends; its final status as a string."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(0.25)
    client.stop_job(job_id)
    raise TimeoutError(f"job {job_id} still running after {timeout:.0f}s")
