"""Ray, started or joined in one place: ``ensure_ray(purpose, ...)``.

Inside a Ray job (``RAY_ADDRESS`` set) or given an ``address``, the driver joins that cluster;
otherwise it starts a local one sized by the caller. Authentication is Ray's own: a cluster started
with ``RAY_AUTH_MODE=token`` is joined with the token in ``RAY_AUTH_TOKEN`` (or Ray's token file),
read by ``ray.init`` from the environment; nothing here handles tokens.

``ray_log_file(path)`` keeps Ray's own output off the user's screen while a command runs: Ray's
driver logs, the workers' stdout/stderr that Ray forwards to the driver, and Ray Data's execution
lines go to ``path`` (a command puts it at ``RUN/logs/ray.log``); Ray Data's progress bars are
turned off. Errors of Ray's loggers still reach the screen, and the product's own lines (a worker's
lines that start ``[llamapro]``) are echoed to stdout. Lines Ray prints on its own, past its
loggers, that say nothing to a user (``RAY_NOISE``: a C++ error line for every Ray Data actor
pool, the raylet's "N PYTHON worker processes" notice, Serve's shutdown retry) go to the file
only; any other line Ray prints that way still reaches the screen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

PRODUCT_MARK = "[llamapro] "
"""What starts a worker line that is the product's own (``TrainRecipe.say``): echoed to the screen."""


def spare_cpus() -> int:
    """Logical CPUs for a local cluster that runs Ray Data actors next to other work: at least 4,
    so the tokenizer actors always get one (with every CPU held, Ray Data starves silently)."""
    return max(4, os.cpu_count() or 1)


def ensure_ray(purpose: str, *, num_cpus: int | None = None, resources: dict | None = None,
               log_to_driver: bool = True, address: str | None = None, namespace: str | None = None,
               include_dashboard: bool | None = None, quiet_data: bool = False,
               publish_address: bool = False, **init_kw) -> bool:
    """Make sure this process is connected to Ray; return True when this call ran ``ray.init``
    (the caller then owns the ``ray.shutdown``), False when Ray was already initialized.

    ``purpose`` names the caller in the log. Where it connects:

    - ``address=None``: the job's cluster when ``RAY_ADDRESS`` is set (``ray.init`` reads it),
      else a new local cluster;
    - ``address="local"``: always a new local cluster, even inside a job;
    - any other ``address``: that cluster.

    Only a new local cluster takes ``num_cpus``, ``resources``, ``include_dashboard`` (None: Ray's
    default, which keeps the dashboard; Train V2 cleans up placement groups through the State API
    it serves, so keep it for training and tuning and pass False for local tools) and ``init_kw``
    (e.g. ``_system_config``). ``log_to_driver`` and ``namespace`` apply either way.
    ``quiet_data`` turns off Ray Data's progress bars and execution banners (for tools whose
    output is a table). ``publish_address`` (a new local cluster only) picks the GCS port up front
    and gives every worker ``RAY_ADDRESS`` in its runtime env, so Train V2's placement-group
    cleaner finds this cluster even when another Ray instance runs on the machine (tuning needs it).
    """
    import ray

    if ray.is_initialized():
        if _SINK is not None:  # e.g. started implicitly by a Ray Data call
            _SINK.attach_workers()
        return False
    if quiet_data:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    common = {"log_to_driver": log_to_driver}
    if namespace is not None:
        common["namespace"] = namespace
    join = address if address not in (None, "local") else (
        None if address == "local" else os.environ.get("RAY_ADDRESS"))
    if join:
        log.info("%s: joining the Ray cluster at %s", purpose, join)
        ray.init(**({"address": address} if address else {}), **common)
    else:
        local = dict(common, **init_kw)
        if address == "local" or publish_address:
            local["address"] = "local"
        if num_cpus is not None:
            local["num_cpus"] = num_cpus
        if resources:
            local["resources"] = resources
        if include_dashboard is not None:
            local["include_dashboard"] = include_dashboard
        log.info("%s: starting a local Ray cluster (%s CPUs)", purpose, num_cpus or "all")
        if publish_address:
            _init_publishing_address(ray, local)
        else:
            ray.init(**local)
    if _SINK is not None:  # a command's log file: the workers' forwarded lines go there from now on
        _SINK.attach_workers()
    if quiet_data:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    return True


def _init_publishing_address(ray, kw: dict) -> str:
    """``ray.init(**kw)`` for a local cluster whose workers know its address (``RAY_ADDRESS`` in
    the job's runtime env). The GCS port is chosen up front so the address is known before the
    workers start."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    address = f"{ray.util.get_node_ip_address()}:{port}"
    env = dict((kw.get("runtime_env") or {}).get("env_vars") or {}, RAY_ADDRESS=address)
    kw = dict(kw, runtime_env=dict(kw.get("runtime_env") or {}, env_vars=env))
    old = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(**kw)
    finally:
        if old is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = old
    return ray.get_runtime_context().gcs_address


# --- Ray's own output into a log file ---------------------------------------------------------------

RAY_NOISE = (
    # Ray's core worker (C++, straight to the process's stderr, at error level) for every actor of
    # a Ray Data actor pool, such as the tokenizer actors: Ray Data passes every pool's setup
    # through the object store, whatever its size (ray-project/ray#53727). Those objects are the
    # driver's own, held for the dataset's life on the driver's node.
    "has constructor arguments in the object store and max_restarts > 0",
    # the raylet, through the driver's error channel: it started more Python workers at once than
    # it expects (Ray Train, Ray Data and the tokenizer actors on a machine with few CPUs). A
    # notice about start-up concurrency, not a failure.
    "PYTHON worker processes have been started on node",
    # Ray, through the same channel, when Serve shuts down: the controller's shutdown call is retried
    # because the controller was just killed (by that shutdown).
    "Task ServeController.graceful_shutdown failed",
)
"""Substrings of lines Ray prints past its loggers that go to the log file only (see the module
docstring); each with the reason it is noise to a llamapro user."""


def _is_noise(line: str) -> bool:
    return any(n in line for n in RAY_NOISE)


class _StderrFilter:
    """This process's file descriptor 2 through a pipe while a command runs: lines with a
    ``RAY_NOISE`` phrase go to ``sink`` (the log file), everything else on to the real stderr as it
    came. Ray's C++ core worker writes its log lines to fd 2 directly, past Python's ``sys.stderr``,
    so this is the only place they can be sorted. ``stop`` puts fd 2 back and forwards whatever is
    still in the pipe; if the reader fails, fd 2 goes back at once (nothing ever blocks on it)."""

    def __init__(self, sink_write):
        self.sink_write = sink_write
        self._orig = None
        self._thread = None
        self._lock = threading.Lock()

    def start(self) -> bool:
        try:
            sys.stderr.flush()
            self._orig = os.dup(2)
            r, w = os.pipe()
            out = os.dup(self._orig)  # the real stderr, kept open by the reader until it is done
            os.dup2(w, 2)
            os.close(w)
        except OSError:  # no fd 2 to redirect (a daemon without one): leave it as it is
            self._orig = None
            return False
        self._thread = threading.Thread(target=self._pump, args=(r, out), name="llamapro-stderr",
                                        daemon=True)
        self._thread.start()
        return True

    def _restore(self) -> None:
        with self._lock:
            orig, self._orig = self._orig, None
        if orig is not None:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(orig, 2)
            os.close(orig)

    def _forward(self, out: int, chunk: bytes) -> None:
        keep = []
        for line in chunk.splitlines(keepends=True):
            text = line.decode("utf-8", "replace")
            if _is_noise(text):
                self.sink_write(text.rstrip("\n"))
            else:
                keep.append(line)
        if keep:
            data = b"".join(keep)
            while data:
                data = data[os.write(out, data):]

    def _pump(self, r: int, out: int) -> None:
        import select

        pending = b""
        try:
            while True:
                ready, _, _ = select.select([r], [], [], 0.2)
                if not ready:  # a line without its end for a while: pass it on as it is
                    if pending:
                        self._forward(out, pending)
                        pending = b""
                    continue
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                pending += chunk
                cut = pending.rfind(b"\n") + 1
                if cut:
                    self._forward(out, pending[:cut])
                    pending = pending[cut:]
                if pending and not pending.startswith(b"["):  # not the start of a Ray log line
                    self._forward(out, pending)
                    pending = b""
            if pending:
                self._forward(out, pending)
        except Exception:  # never leave fd 2 pointing at a pipe nobody reads
            with contextlib.suppress(Exception):
                self._restore()
        finally:
            os.close(r)
            os.close(out)

    def stop(self) -> None:
        self._restore()
        if self._thread is not None:
            self._thread.join(timeout=2.0)  # EOF once fd 2 is back (unless a child still holds it)
            self._thread = None


_SINK: RayLogFile | None = None


def active_log_file() -> RayLogFile | None:
    """The log file a command installed with :func:`ray_log_file`, or None (library use, tests)."""
    return _SINK


def _say(msg: str) -> None:
    print(msg, flush=True)


class RayLogFile:
    """Where Ray's output goes while a command runs (see :func:`ray_log_file`)."""

    def __init__(self, path, verbose: bool = False, echo=_say):
        self.path, self.verbose, self.echo = Path(path), verbose, echo
        self.quiet: tuple[str, ...] = ()  # product lines the driver prints itself (its progress)
        self._lock = threading.Lock()
        self._f = None
        self._undo: list = []
        self._dispatcher = None
        self._recent: dict = {}
        self._fh = None

    # what goes where ----------------------------------------------------------------------------

    def write(self, text: str) -> None:
        with self._lock:
            if self._f is not None:
                self._f.write(text if text.endswith("\n") else text + "\n")
                self._f.flush()

    def worker_lines(self, data: dict) -> None:
        """One batch of a worker's forwarded stdout/stderr (the dict Ray's log monitor publishes):
        every line to the file; the product's own lines (``[llamapro] ...``) also to the screen,
        except those the driver prints itself (``quiet``); Ray's progress-bar updates nowhere."""
        try:
            from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC
        except ImportError:  # pragma: no cover - older Ray
            RAY_TQDM_MAGIC = "__ray_tqdm_magic_token__"
        who = data.get("actor_name") or data.get("task_name") or ""
        ip = data.get("ip")
        where = f"({who + ' ' if who else ''}pid={data.get('pid')}"
        where += f", ip={ip})" if ip and ip != data.get("localhost") else ")"
        stream = " stderr" if data.get("is_err") else ""
        out = []
        for line in data.get("lines") or []:
            if RAY_TQDM_MAGIC in line:
                continue
            out.append(f"{time.strftime('%H:%M:%S')} {where}{stream} {line}")
            i = line.find(PRODUCT_MARK)
            if i >= 0 and not self.verbose:
                msg = line[i + len(PRODUCT_MARK):]
                if not (self.quiet and msg.startswith(self.quiet)) and self._first_time(data.get("pid"), msg):
                    self.echo(f"      {msg}")
        if out:
            self.write("\n".join(out))

    def _first_time(self, pid, msg: str, within_s: float = 30.0) -> bool:
        """False for a line the same worker said moments ago: Ray Train also sends a worker's
        ``print`` through its logger to stderr, so each product line arrives twice."""
        now = time.monotonic()
        key = (pid, msg)
        if now - self._recent.get(key, -within_s) < within_s:
            return False
        if len(self._recent) > 512:
            self._recent = {k: t for k, t in self._recent.items() if now - t < within_s}
        self._recent[key] = now
        return True

    # install / remove ---------------------------------------------------------------------------

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8", buffering=1)
        self.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv) or 'llamapro'} "
                   f"(pid {os.getpid()})")
        self._install_loggers()
        import ray

        if ray.is_initialized():
            self.attach_workers()

    def _install_loggers(self) -> None:
        """Ray's loggers (``ray`` and those that do not hand records up to it, such as
        ``ray.data``): a handler into the file; their console handlers keep only errors (Ray's
        warnings, e.g. that progress bars are off or that token authentication is on, are for
        the file)."""
        import ray  # noqa: F401  (configures the "ray" logger)

        try:
            import ray.data  # noqa: F401  (configures "ray.data"; its logs are wanted in the file)
            ctx = ray.data.DataContext.get_current()
            if not self.verbose:
                old = ctx.enable_progress_bars
                ctx.enable_progress_bars = False
                self._undo.append(lambda: setattr(ctx, "enable_progress_bars", old))
        except ImportError:  # pragma: no cover - ray[data] is a dependency
            pass
        self._fh = logging.StreamHandler(self)
        self._fh.setLevel(logging.INFO)
        self.refresh_loggers()

    _FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")

    def refresh_loggers(self) -> None:
        """Take over Ray loggers configured since (``ray.serve`` configures its own when imported);
        and keep this file's format (``ray.init`` sets its format on every handler of ``ray``)."""
        fh = self._fh
        if fh is None:
            return
        fh.setFormatter(self._FORMAT)
        loggers = [logging.getLogger("ray")] + [
            lg for name, lg in list(logging.Logger.manager.loggerDict.items())
            if name.startswith("ray.") and isinstance(lg, logging.Logger) and not lg.propagate]
        for lg in loggers:
            if fh not in lg.handlers:
                lg.addHandler(fh)
                self._undo.append(lambda lg=lg: lg.removeHandler(fh))
            if lg.level > logging.INFO:  # raised elsewhere in this process: the file wants INFO
                old_level = lg.level
                lg.setLevel(logging.INFO)
                self._undo.append(lambda lg=lg, old=old_level: lg.setLevel(old))
            if self.verbose:
                continue
            for h in lg.handlers:
                if h is not fh and isinstance(h, logging.StreamHandler) and not isinstance(
                        h, logging.FileHandler) and h.level < logging.ERROR:
                    old = h.level
                    h.setLevel(logging.ERROR)
                    self._undo.append(lambda h=h, old=old: h.setLevel(old))

    def attach_workers(self) -> None:
        """Once Ray is up: the workers' forwarded output to the file (with ``-v`` to the file
        and, as Ray does, to the screen). Without ``log_to_driver`` nothing is forwarded."""
        self.refresh_loggers()
        if self._dispatcher is not None:
            return
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as disp
        except ImportError:  # pragma: no cover - Ray moved it: Ray's own printing stays as it was
            self.write("llamapro: this Ray has no worker log dispatcher; worker output stays on the console")
            return
        self._dispatcher = disp
        if not self.verbose:
            self._filter_ray_prints()
        with disp._lock:
            ray_own = [(n, h) for n, h in disp.handlers if n == "ray_print_logs"]
        if not self.verbose:
            disp.remove_handler("ray_print_logs")
        disp.add_handler("llamapro_log_file", self.worker_lines)

        def undo():
            disp.remove_handler("llamapro_log_file")
            import ray

            if not self.verbose and ray_own and ray.is_initialized():
                with disp._lock:
                    if not any(n == "ray_print_logs" for n, _ in disp.handlers):
                        disp.handlers.append(ray_own[0])
        self._undo.append(undo)

    def _filter_ray_prints(self) -> None:
        """``RAY_NOISE`` lines off the screen: the raylet's messages (which the driver prints
        through ``ray._private.worker.print_to_stdstream``) and the C++ core worker's stderr."""
        import ray._private.worker as rw

        original = rw.print_to_stdstream

        def print_to_stdstream(data, *args, **kw):
            lines = data.get("lines") or []
            if lines and all(_is_noise(line) for line in lines):
                self.write("\n".join(f"{time.strftime('%H:%M:%S')} (raylet) {line}" for line in lines))
                return None
            return original(data, *args, **kw)

        rw.print_to_stdstream = print_to_stdstream
        self._undo.append(lambda: setattr(rw, "print_to_stdstream", original))
        f = _StderrFilter(self.write)
        if f.start():
            self._undo.append(f.stop)

    def stop(self) -> None:
        for undo in reversed(self._undo):
            with contextlib.suppress(Exception):
                undo()
        self._undo.clear()
        self._fh = None
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None

    # a file-like object for logging.StreamHandler
    def flush(self) -> None:
        pass


@contextlib.contextmanager
def ray_log_file(path, verbose: bool = False):
    """Ray's output into ``path`` for the duration of the block (see the module's docstring);
    ``verbose`` (``llamapro -v``) writes the file and leaves Ray's console output as it is. When the
    block fails, the log's path is printed to stderr (the caller prints the error itself: a
    ``LlamaproError``'s message, or a traceback), so a failure is never silent and Ray's side of it
    is one file away."""
    global _SINK
    if _SINK is not None:  # nested (a command calling another): the outer file keeps everything
        yield _SINK
        return
    sink = RayLogFile(path, verbose)
    sink.start()
    _SINK = sink
    try:
        yield sink
    except BaseException:
        print(f"Ray's log of this run: {sink.path}", file=sys.stderr, flush=True)
        raise
    finally:
        _SINK = None
        sink.stop()
