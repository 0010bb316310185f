"""The form of the ``jobs/*.py`` Ray job entrypoints whose `llamapro` verb takes paths instead of
a config (expand, export, fuse): ``--config FILE [dotted overrides]``, the run directory and
outputs from the config, the same step function (``llamapro.pipeline``), printout and exit codes
as the verb. (jobs/eval.py, train.py, tune.py and pipeline.py call ``llamapro.cli.main`` itself.)
"""

from __future__ import annotations

import argparse

from llamapro.cli.exits import report
from llamapro.errors import EXIT_OK, LlamaproError


def _say(step: str):
    return lambda m: print(f"[{step}] {m}", flush=True)


def expand(cfg) -> int:
    """Expand ``model.base`` into ``RUN/expanded`` and prove identity (uploaded for a URI run)."""
    from llamapro.expansion.api import summary
    from llamapro.pipeline import expand_step

    print(summary(expand_step(cfg, force=True, progress=False)))
    return EXIT_OK


def export(cfg) -> int:
    """Export the run to ``export.out`` (default ``RUN/export``), as `llamapro export RUN OUT`."""
    from llamapro.cli.eval import print_export
    from llamapro.pipeline import export_step

    print_export(export_step(cfg, say=_say("export")))
    return EXIT_OK


def fuse(cfg) -> int:
    """Fuse the run into ``fuse.out`` (default ``RUN/fused``), as `llamapro fuse RUN OUT`; exit 4
    when fuse.alpha=auto finds no alpha that passes the gate."""
    from llamapro.pipeline import fuse_step
    from llamapro.publish.fuse import format_fusion

    print(format_fusion(fuse_step(cfg, say=_say("fuse"))), flush=True)
    return EXIT_OK


STEPS = {"expand": expand, "export": export, "fuse": fuse}


def job_main(step: str, argv=None, description: str | None = None) -> int:
    """``python jobs/<step>.py --config FILE [overrides]``: the exit code."""
    from llamapro.config import load_config

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. run.name=demo ({step} reads its section)")
    a = p.parse_args(argv)
    try:
        return STEPS[step](load_config(a.config, a.overrides))
    except LlamaproError as e:
        return report(e)
