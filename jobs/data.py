"""Preview the training data (read, tokenize, mix, pack) on the cluster: a Ray job.

    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
        python jobs/data.py --config jobs/configs/data_demo.yaml data.seq_len=512 --json

Reads model (its tokenizer; model.base may be a URI) and data (sources may be files, globs or
s3:// / gs:// URIs); builds the demo corpora first when the config names them (demo:NAME).
Prints per source the documents read, skipped (and why), held out, tokens, packed blocks and
mixture shares, then the first block (--json: one JSON document).
Exit codes: 0 ok, 2 a training run would fail on this data.
"""

import argparse
import sys

from llamapro.cli.data import cmd_data_preview
from llamapro.cli.exits import report
from llamapro.config import load_config
from llamapro.errors import LlamaproError
from llamapro.pipeline import base_model_dir, ensure_demo_corpora


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=512")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--max-files", type=int, default=None, help="read at most N shards per source")
    p.add_argument("--tokenizer", default=None, help="default: the config's model.base")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        ensure_demo_corpora(cfg)
        a.tokenizer = a.tokenizer or base_model_dir(cfg)  # demo:NAME converted, a URI downloaded
    except LlamaproError as e:
        return report(e)
    return cmd_data_preview(a)  # `llamapro data preview`


if __name__ == "__main__":
    sys.exit(main())
