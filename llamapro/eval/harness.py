"""lm-evaluation-harness (optional): its tasks run on an already loaded model, offline."""

from __future__ import annotations

import importlib.util
import os

from llamapro.config.eval import LmEvalConfig
from llamapro.errors import LmEvalUnavailable


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def require_lm_eval() -> None:
    if not lm_eval_available():
        raise LmEvalUnavailable(
            "eval.lm_eval.enabled is true but lm-evaluation-harness is not installed. Install it "
            "with `pip install lm-eval` (and keep the tasks' data on local disk), or set "
            "eval.lm_eval.enabled=false.")


def run_lm_eval(model, tokenizer, cfg: LmEvalConfig) -> dict:
    """Run local lm-eval tasks on an already loaded model; ``{task: {metric: value}}``."""
    require_lm_eval()
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # local task data only; never the hub
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=cfg.include_path or None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
                                  limit=cfg.limit or None, task_manager=tm, log_samples=False)
    return {task: {m: v for m, v in metrics.items() if isinstance(v, (int, float))}
            for task, metrics in (res or {}).get("results", {}).items()}
