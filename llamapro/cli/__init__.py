"""`llamapro <verb>`: the command line. Each verb calls the same library function as jobs/.

Exit codes (``llamapro.errors``): 0 success; 1 a failure while running; 2 bad input (config,
arguments, checkpoint); 3 identity proof failed; 4 a regression gate failed; 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from llamapro.cli.exits import interrupted, report
from llamapro.errors import LlamaproError


def build_parser() -> argparse.ArgumentParser:
    """Every command, each group registered by the module beside it."""
    from llamapro.cli.data import add_data_commands
    from llamapro.cli.eval import add_compare_command, add_eval_commands
    from llamapro.cli.expand import add_expand_commands
    from llamapro.cli.fuse import add_fuse_command
    from llamapro.cli.run import add_run_commands
    from llamapro.cli.serve import add_serve_commands

    p = argparse.ArgumentParser(prog="llamapro", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true",
                   help="INFO logs; for run and train also Ray's own output on screen (it always goes "
                        "to RUN/logs/ray.log)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    add_expand_commands(sub)  # expand verify strip pack apply demo-model
    add_run_commands(sub)  # run train tune
    add_data_commands(sub)
    add_eval_commands(sub)  # eval export
    add_compare_command(sub)
    add_serve_commands(sub)
    add_fuse_command(sub)
    return p


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_libraries() -> None:
    """Without ``-v``, what libraries say on their own that is no news to a llamapro user stays off
    the screen (errors still show): transformers' per-load progress bars ("Loading weights",
    "Writing model shards"; also in Ray workers started from here, which inherit the environment),
    torchao's import-time notes about optional kernels this machine lacks, torch's deprecation
    notes raised by torchao's import, and DeepSpeed's "Setting accelerator to CPU" on a machine
    that has no GPU to detect. The product's own progress bars (expand, verify) are unaffected."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # DeepSpeed sets its logger's level when imported; a filter stays on the logger object
    logging.getLogger("DeepSpeed").addFilter(_DropMessages("Setting accelerator to CPU"))


def main(argv=None) -> int:
    """``llamapro ARGV``: the exit code. A deliberate llamapro error prints one line and exits with
    its own code (``llamapro.errors``); anything else is a bug and raises with its traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        quiet_libraries()
    try:
        return args.fn(args)
    except LlamaproError as e:  # e.g. a TrainingError: the workers' own lines, not Ray's traceback
        return report(e)
    except KeyboardInterrupt:
        return interrupted()


if __name__ == "__main__":
    sys.exit(main())
