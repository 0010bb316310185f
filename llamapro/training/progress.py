"""The training progress the driver prints: one line per optimizer step, at most one every few
seconds (always the first and last step of each stage), read from the records rank 0 appends to
``RUN/metrics.jsonl``::

      train stage 1/2 step 3/8 loss 4.1234 | 2,345 tok/s | 0:42 elapsed, ~1:10 left

(the first step's line says ``warm-up step`` instead of a time left) and one line per held-out
evaluation. :class:`Progress` turns records into lines (plain data, no Ray); :class:`MetricsTail`
follows the file from a thread while Ray Train's ``fit`` runs.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from llamapro.training.stages import allocate, build_stages

# worker lines (``TrainRecipe.say``) that say what these lines say: kept off the screen meanwhile
WORKER_LINES_REPLACED = ("step ", "eval step ")


def schedule_steps(tc, new_layers, seq_len: int) -> list[int]:
    """Optimizer steps of each stage, as the workers plan them (``TrainRecipe.setup_schedule``)."""
    stages = (build_stages(new_layers or [0], tc.num_stages, tc.stage_ratios, tc.top_lr_scale,
                           tc.cumulative, tc.final_originals_ratio)
              if tc.mode == "llamapro" else build_stages([0]))
    return [s.steps for s in allocate(stages, tc.total_steps(seq_len))]


def clock(seconds: float) -> str:
    """``H:MM:SS`` (or ``M:SS`` under an hour)."""
    s = max(0, int(round(seconds)))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Records in, lines out. ``stage_steps``: the planned steps of each stage (a ``stage_start``
    record corrects its stage). ``every_s``: the least time between two step lines, except at a
    stage's first and last step. ``now``: the clock (seconds), for tests."""

    def __init__(self, stage_steps: list[int], every_s: float = 5.0, label: str = "train", now=time.monotonic):
        self.stage_steps = list(stage_steps) or [0]
        self.every_s, self.label, self.now = every_s, label, now
        self.t0 = now()
        self.first = None      # (time, step) of the first step record seen
        self.last_line = None  # when the last step line was printed
        self.pending = []      # step records since the last step line
        self.step_s = []       # each step's own seconds

    @property
    def total(self) -> int:
        return sum(self.stage_steps)

    def feed(self, rec: dict) -> str | None:
        """The line to print for ``rec``, or None."""
        ev = rec.get("event")
        if ev == "stage_start" and isinstance(rec.get("steps"), int):
            k = int(rec.get("stage", 0))
            if k < len(self.stage_steps):
                self.stage_steps[k] = rec["steps"]
            return None
        if ev == "eval" and isinstance(rec.get("eval_loss"), dict):
            losses = ", ".join(f"{n} {v:.4f}" for n, v in rec["eval_loss"].items())
            return f"      held-out loss at step {rec.get('step')}: {losses}"
        if ev != "step" or not isinstance(rec.get("step"), int):
            return None
        t, step, k = self.now(), rec["step"], int(rec.get("stage", 0))
        if self.first is None:
            self.first = (t, step)
        self.pending.append(rec)
        stage_end = sum(self.stage_steps[:k + 1])
        edge = step == stage_end or step - 1 == sum(self.stage_steps[:k]) or step >= self.total
        if not (edge or self.last_line is None or t - self.last_line >= self.every_s):
            return None
        self.last_line = t
        recs, self.pending = self.pending, []
        step_s = sum(float(r.get("step_s") or 0) for r in recs)
        tokens = sum(float(r.get("tokens_per_s") or 0) * float(r.get("step_s") or 0) for r in recs)
        tok_s = tokens / step_s if step_s > 0 else float(rec.get("tokens_per_s") or 0)
        self.step_s.append(float(rec.get("step_s") or 0))
        t_first, s_first = self.first
        # seconds a step: the wall clock since the first step seen (evaluations, checkpoints and
        # stage changes included), but never less than the steps' own time (records read in one
        # batch arrive together); the first step (warm-up) counts only while it is the only one
        own = self.step_s[1:] or self.step_s
        per_step = max((t - t_first) / (step - s_first) if step > s_first else 0.0, sum(own) / len(own))
        left = max(0, self.total - step) * per_step
        loss = rec.get("loss")
        loss_s = f"loss {loss:.4f}" if isinstance(loss, (int, float)) else "loss ?"
        # the first step seen alone says nothing about the rest (it carries start-up and, with
        # compiled layers, compilation: the demo's was 9x a later step): no estimate from it
        when = "warm-up step" if step == s_first and step < self.total else f"~{clock(left)} left"
        return (f"      {self.label} stage {k + 1}/{len(self.stage_steps)} step {step}/{self.total} "
                f"{loss_s} | {tok_s:,.0f} tok/s | {clock(t - self.t0)} elapsed, {when}")


class MetricsTail:
    """Follow ``path`` (JSON lines appended by rank 0) from a thread; each complete new record
    goes through ``progress`` and any line it makes to ``say``. Records already in the file when it
    starts (an earlier attempt's) are skipped. ``on_first`` runs at the first record read."""

    def __init__(self, path, progress: Progress, say=print, poll_s: float = 0.5, on_first=None):
        self.path, self.progress, self.say, self.poll_s = Path(path), progress, say, poll_s
        self.on_first = on_first
        self.offset = self.path.stat().st_size if self.path.is_file() else 0
        self.partial = b""
        self.seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llamapro-progress", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        self.read()  # the last records (the final step) before the caller prints what follows
        return False

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.read()
            except Exception as e:  # progress is a courtesy: never let it break a training run
                self.say(f"      (progress display stopped: {type(e).__name__}: {e})")
                return

    def read(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size < self.offset:  # replaced (a resumed worker downloaded the run's copy): start over
            self.offset, self.partial = 0, b""
        if size == self.offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for raw in lines:
            try:
                rec = json.loads(raw)
            except ValueError:  # a torn line (see llamapro.jsonl): skip it
                continue
            if not isinstance(rec, dict):
                continue
            self.seen += 1
            if self.seen == 1 and self.on_first is not None:
                self.on_first()
            line = self.progress.feed(rec)
            if line:
                self.say(line)
