"""`llamapro serve` as users run it: a subprocess that serves a config, re-reads it on SIGHUP (canary
shift in place) and shuts down cleanly on SIGTERM (what systemd, Kubernetes and `ray job stop` send;
Ctrl-C takes the same path) with exit 0. The API key comes from an environment variable."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from tests.integration.serve_conftest_helpers import free_port, make_tiny_chat_model, openai_client

pytestmark = pytest.mark.integration

KEY = "sk-cli-test-key-42"
# `llamapro serve` once the CLI registers it; until then the same handler through its own parser
SHIM = ("import argparse, sys\n"
        "from llamapro.cli.serve import add_serve_commands\n"
        "p = argparse.ArgumentParser(prog='llamapro')\n"
        "add_serve_commands(p.add_subparsers(dest='cmd'))\n"
        "a = p.parse_args(sys.argv[1:])\n"
        "sys.exit(a.fn(a))\n")


def _command():
    import argparse

    from llamapro.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction) and "serve" in action.choices:
            return [sys.executable, "-m", "llamapro.cli", "serve"]
    return [sys.executable, "-c", SHIM, "serve"]


def _write(path, port, base, exp, weights):
    path.write_text(yaml.safe_dump({"serve": {
        "app_name": "lp-cli-test", "port": port, "api_key_env": "LLAMAPRO_CLI_TEST_KEY",
        "models": {"base": {"path": str(base), "num_cpus": 0.5, "torch_threads": 1},
                   "expanded": {"path": str(exp), "num_cpus": 0.5, "torch_threads": 1}},
        "canary": {"weights": weights}}}))


def _wait_for(lines: queue.Queue, needle: str, timeout: float, seen: list) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line is None:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not seen; output tail:\n" + "".join(seen[-40:]))


def test_llamapro_serve_reload_and_shutdown(tmp_path):
    base = make_tiny_chat_model(tmp_path / "base", seed=0)
    exp = make_tiny_chat_model(tmp_path / "exp", seed=1)
    port = free_port()
    conf = tmp_path / "serve.yaml"
    _write(conf, port, base, exp, {"base": 1.0})
    env = {**os.environ, "LLAMAPRO_CLI_TEST_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*_command(), "--config", str(conf), "--num-cpus", "4"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: ([lines.put(ln) for ln in proc.stdout], lines.put(None)),
                     daemon=True).start()
    seen: list = []
    try:
        _wait_for(lines, f"serving http://127.0.0.1:{port}/v1", 400, seen)
        assert not any(KEY in ln for ln in seen)  # the key is never printed
        client = openai_client(port, api_key=KEY)

        def served():
            return client.completions.create(model="llamapro", prompt="x", max_tokens=1).model

        assert {served() for _ in range(5)} == {"base"}
        _write(conf, port, base, exp, {"expanded": 1.0})
        proc.send_signal(signal.SIGHUP)
        _wait_for(lines, "redeployed", 120, seen)
        assert {served() for _ in range(5)} == {"expanded"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0  # once: a native stack dump and exit 134
        _wait_for(lines, "stopped", 30, seen)
        out = "".join(seen)
        assert "SIGTERM: shutting down" in out
        assert "Fatal Python error" not in out and "Stack (most recent" not in out
        assert KEY not in out  # the key is never printed, start to end
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
