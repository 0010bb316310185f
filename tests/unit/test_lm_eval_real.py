"""The real lm-evaluation-harness path of `eval.lm_eval`: a local multiple-choice task (its data a
jsonl file written here, no hub) run by lm_eval itself on a tiny trained run, for the trained model
and its base. Runs whenever lm_eval is installed (the dev extra installs it); skips, saying so, only
where it is not. (tests/unit/test_eval_gate.py covers the not-installed message.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from llamapro.config.eval import EvalConfig, GateConfig, LmEvalConfig
from llamapro.eval import evaluate_checkpoint, lm_eval_available
from tests.unit.eval_support import make_run

pytestmark = pytest.mark.skipif(not lm_eval_available(),
                                reason="lm_eval is not installed (pip install -e '.[dev]' installs it)")

TASK = """task: llamapro_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_tasks_run_for_real_on_trained_and_base(tmp_path):
    root = tmp_path / "runs"
    run = make_run(root, "same", perturb=0.0, chat=True)  # untrained blocks: trained == base
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "mc.jsonl"
    with open(data, "w") as f:
        for i in range(6):
            f.write(json.dumps({"question": f"{i} + 1 =", "choices": [str(i + 1), str(i + 5)],
                                "answer": 0}) + "\n")
    (tasks / "llamapro_tiny_mc.yaml").write_text(TASK.format(data=data))
    cfg = EvalConfig(max_new_tokens=2, gate=GateConfig(enabled=False),
                     lm_eval=LmEvalConfig(enabled=True, tasks=["llamapro_tiny_mc"],
                                          include_path=str(tasks), limit=4))
    held = {"x": {"input_ids": np.ones((2, 8), dtype=np.int64), "labels": np.ones((2, 8), dtype=np.int64)}}
    r = evaluate_checkpoint(run / "model", held, None, cfg, out_dir=tmp_path / "eval")
    lm = r["lm_eval"]
    assert lm["tasks"] == ["llamapro_tiny_mc"]
    trained, base = lm["trained"]["llamapro_tiny_mc"], lm["base"]["llamapro_tiny_mc"]
    acc = next(k for k in trained if k.startswith("acc") and "stderr" not in k)
    assert 0.0 <= trained[acc] <= 1.0
    assert trained[acc] == base[acc]  # the new blocks are identities: the same answers
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["lm_eval"]["trained"]["llamapro_tiny_mc"][acc] == trained[acc]
