"""The console of `llamapro run` / `train`: the driver's progress lines (from metrics.jsonl
records) and Ray's own output kept in RUN/logs/ray.log (issue 17, last bullet). The real run is
tests/integration/test_console_train.py."""

from __future__ import annotations

import json
import os
import logging
import re

import pytest

from llamapro.training.progress import MetricsTail, Progress, clock, schedule_steps


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _step(step, stage, loss=3.0, tps=1000.0, step_s=1.0):
    return {"event": "step", "step": step, "stage": stage, "loss": loss, "tokens": step * int(tps * step_s),
            "tokens_per_s": tps, "step_s": step_s}


def test_clock():
    assert [clock(s) for s in (0, 59.4, 61, 3599, 3600, 3725)] == ["0:00", "0:59", "1:01", "59:59",
                                                                   "1:00:00", "1:02:05"]


def test_a_line_per_step_at_most_every_few_seconds_with_stage_loss_speed_and_time_left():
    now = Clock()
    p = Progress([2, 10], every_s=5.0, now=now)
    lines = {}
    for k in range(1, 13):
        now.t = float(k)  # one step a second
        line = p.feed(_step(k, 0 if k <= 2 else 1, loss=5.0 - k / 10, tps=1000.0 + k))
        if line:
            lines[k] = line
    # first step, each stage's first and last step, and otherwise one line per 5 s
    assert sorted(lines) == [1, 2, 3, 8, 12]
    # a fixed clock and fed records: this checks the line's format and arithmetic, never the machine's speed
    assert lines[1] == "      train stage 1/2 step 1/12 loss 4.9000 | 1,001 tok/s | 0:01 elapsed, warm-up step"
    # step 8: 1 s a step since step 1, 4 steps left; speed over the steps since the last line
    assert lines[8] == ("      train stage 2/2 step 8/12 loss 4.2000 | 1,006 tok/s | 0:08 elapsed, "
                        "~0:04 left")
    assert lines[12].endswith("0:12 elapsed, ~0:00 left") and "stage 2/2 step 12/12" in lines[12]


def test_time_left_is_never_less_than_the_steps_own_time():
    """Records read in one batch arrive together: the wall clock between them says nothing, the
    steps' own seconds do (the first step, with its warm-up, gives no estimate and is left out of
    the later ones)."""
    now = Clock()
    p = Progress([10], every_s=0, now=now)
    now.t = 30.0
    assert p.feed(_step(1, 0, step_s=20.0)).endswith("0:30 elapsed, warm-up step")  # no estimate from it
    assert p.feed(_step(2, 0, step_s=2.0)).endswith("~0:16 left")  # same instant: 8 x 2 s
    now.t = 60.0
    assert p.feed(_step(3, 0, step_s=2.0)).endswith("~1:45 left")  # 30 s for 2 steps: 7 x 15 s


def test_stage_start_corrects_the_plan_and_eval_records_make_a_line():
    p = Progress([3, 3], now=Clock())
    assert p.feed({"event": "stage_start", "stage": 1, "steps": 5}) is None
    assert p.total == 8
    assert p.feed({"event": "eval", "step": 4, "eval_loss": {"code": 2.5, "prose": 3.25}}) == \
        "      held-out loss at step 4: code 2.5000, prose 3.2500"
    assert p.feed({"event": "resume", "step": 2}) is None


def test_schedule_steps_is_the_workers_plan():
    from llamapro.config.train import TrainConfig

    tc = TrainConfig(max_steps=10, max_tokens=0, num_stages=2, stage_ratios=[0.3])
    assert schedule_steps(tc, [2, 5], 32) == [3, 7]
    assert schedule_steps(TrainConfig(mode="full", max_steps=10, max_tokens=0), [], 32) == [10]


def test_tail_skips_old_records_and_torn_lines_and_reads_the_last_ones_at_exit(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_step(1, 0)) + "\n")  # an earlier attempt's: not shown again
    said, first = [], []
    tail = MetricsTail(path, Progress([3], every_s=0, now=Clock()), say=said.append, poll_s=60,
                       on_first=lambda: first.append(True))
    with tail:
        with open(path, "a") as f:
            f.write(json.dumps(_step(2, 0)) + "\n{torn\n" + json.dumps(_step(3, 0))[:-3])
        tail.read()
        assert len(said) == 1 and "step 2/3" in said[0] and first == [True]
        with open(path, "a") as f:
            f.write(json.dumps(_step(3, 0))[-3:] + "\n")  # the rest of the half-written record
    assert len(said) == 2 and "step 3/3" in said[1]  # read on exit, without waiting for a poll


# --- Ray's output into the log file ------------------------------------------------------------------


def test_ray_logs_go_to_the_file_and_only_errors_to_the_screen(tmp_path):
    import io

    import ray  # noqa: F401  (configures the "ray" logger)

    from llamapro.runtime import active_log_file, ray_log_file

    lg = logging.getLogger("ray")
    levels = [h.level for h in lg.handlers]
    # Ray's console handler holds the stderr of whichever test imported ray first (pytest's capture
    # swaps sys.stderr per test), so read "the screen" from that handler itself, not from capsys
    screen = io.StringIO()
    consoles = [h for h in lg.handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    assert consoles, "ray's logger has no console handler: this test has nothing to check"
    streams = [h.setStream(screen) for h in consoles]
    path = tmp_path / "logs" / "ray.log"
    # something else in this process (a quiet `llamapro data preview`, a user's notebook) raised
    # ray.data's level: the file still gets its INFO lines, and the level comes back afterwards
    import ray.data  # noqa: F401  (configures its logger on first import: do that before raising it)

    data_lg = logging.getLogger("ray.data")
    data_level = data_lg.level
    data_lg.setLevel(logging.WARNING)
    with ray_log_file(path) as sink:
        assert active_log_file() is sink
        lg.info("Started a local Ray instance (test)")
        logging.getLogger("ray.data").info("Starting execution of Dataset (test)")
        logging.getLogger("ray.data").warning("Progress bars disabled (test)")
        lg.error("a Ray error (test)")
        # a Ray logger configured later with its own console handler (as ray.serve does on import)
        late = logging.getLogger("ray.console_test_late")
        late.propagate, late_handler = False, logging.StreamHandler(screen)
        late.addHandler(late_handler)
        sink.refresh_loggers()
        late.warning("a late logger's warning (test)")
    late.removeHandler(late_handler)
    assert data_lg.level == logging.WARNING
    data_lg.setLevel(data_level)
    for h, stream in zip(consoles, streams):
        h.setStream(stream)
    err = screen.getvalue()
    assert "a Ray error (test)" in err
    for msg in ("Started a local Ray instance", "Starting execution of Dataset", "Progress bars disabled",
                "a late logger's warning"):
        assert msg not in err
    text = path.read_text()
    for msg in ("Started a local Ray instance (test)", "Starting execution of Dataset (test)",
                "Progress bars disabled (test)", "a Ray error (test)", "a late logger's warning (test)"):
        assert msg in text
    # everything as it was afterwards
    assert active_log_file() is None and [h.level for h in lg.handlers] == levels
    lg.info("after (test)")
    assert "after (test)" not in path.read_text()


def test_worker_lines_go_to_the_file_and_the_products_own_lines_to_the_screen(tmp_path):
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    from llamapro.runtime import RayLogFile

    shown = []
    sink = RayLogFile(tmp_path / "ray.log", echo=shown.append)
    sink.start()
    try:
        batch = {"pid": 42, "ip": "10.0.0.2", "localhost": "10.0.0.1", "actor_name": "RayTrainWorker",
                 "is_err": False,
                 "lines": ["[llamapro] stage 1/2 new-0: layers [2]", "[llamapro] step    1 stage 0 loss 4.1",
                           "Setting up process group for: env:// [rank=0, world_size=1]",
                           RAY_TQDM_MAGIC + '{"x": 1}']}
        sink.worker_lines(dict(batch, is_err=True))  # Ray Train's print patch: the same lines on stderr
        sink.quiet = ("step ",)  # the driver prints the steps itself from now on
        sink.worker_lines(dict(batch))
        sink.worker_lines({"pid": 7, "is_err": True, "lines": ["Traceback (most recent call last):"]})
        sink.worker_lines({"pid": 43, "lines": ["[llamapro] stage 1/2 new-0: layers [2]"]})  # another worker
    finally:
        sink.stop()
    # each product line once (a repeat from the same worker moments later is the stderr copy)
    assert shown == ["      stage 1/2 new-0: layers [2]", "      step    1 stage 0 loss 4.1",
                     "      stage 1/2 new-0: layers [2]"]
    text = (tmp_path / "ray.log").read_text()
    assert re.search(r"\(RayTrainWorker pid=42, ip=10\.0\.0\.2\) Setting up process group", text)
    assert "(pid=7) stderr Traceback" in text
    assert text.count("[llamapro] step    1") == 2 and RAY_TQDM_MAGIC not in text


def test_a_failure_names_the_log_file_on_screen(tmp_path, capsys):
    from llamapro.runtime import ray_log_file

    path = tmp_path / "ray.log"
    with pytest.raises(RuntimeError, match="boom"), ray_log_file(path):
        raise RuntimeError("boom")
    assert f"Ray's log of this run: {path}" in capsys.readouterr().err
    assert path.is_file()


QUIET_SCRIPT = r"""
import logging, sys
from llamapro.cli import quiet_libraries
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
if sys.argv[2] == "quiet":
    quiet_libraries()
import torchao  # noqa: F401  (its import notes optional kernels this machine lacks)
from deepspeed.accelerator import get_accelerator
get_accelerator()  # on a machine without a GPU: "Setting accelerator to CPU ..."
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])  # "Loading weights" bar
logging.getLogger("DeepSpeed").error("a DeepSpeed error (test)")
logging.getLogger("torchao").error("a torchao error (test)")
"""


@pytest.mark.parametrize("mode", ["quiet", "loud"])
def test_libraries_chatter_stays_off_the_screen_without_verbose(tmp_path, mode):
    """What `llamapro` (without -v) keeps off the screen, in a fresh process: transformers' loading
    bars, torchao's import notes, DeepSpeed's CPU-accelerator notice; errors still show. The loud
    run (what `-v` leaves alone) shows that each of those really is printed, so the test can fail."""
    import subprocess
    import sys

    from tests.tiny_models import tiny_model

    tiny_model("llama", num_layers=2).save_pretrained(tmp_path / "m")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    r = subprocess.run([sys.executable, "-c", QUIET_SCRIPT, str(tmp_path / "m"), mode], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    screen = r.stdout + r.stderr
    assert "a DeepSpeed error (test)" in screen and "a torchao error (test)" in screen
    chatter = ["Loading weights", "Setting accelerator to CPU"]
    try:
        import torch

        if torch.cuda.is_available():
            chatter.remove("Setting accelerator to CPU")  # DeepSpeed finds the GPU: nothing to say
    except ImportError:  # pragma: no cover
        pass
    for line in chatter:
        assert (line in screen) == (mode == "loud"), f"{line!r} ({mode}):\n{screen[-3000:]}"
    if mode == "quiet":
        assert "WARNING torchao" not in screen, screen[-3000:]
