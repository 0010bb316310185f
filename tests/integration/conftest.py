"""The integration session's shared fixtures: one local Ray cluster, the tiny expanded models the
training tests train, and the trained runs that more than one test file reads (each trained once).

The Ray cluster follows Ray's own ``python/ray/train/tests/conftest.py::ray_start_4_cpus``, but
session-scoped: starting Ray costs seconds here, so every test shares one cluster. Four logical
CPUs on this 2-core machine on purpose: two Train-style consumers hold one CPU each and Ray Data's
tokenizer actors need the rest. With ``num_cpus=2`` the actors never start and nothing errors (Ray
Data starves silently).
"""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_start_4_cpus():
    import ray

    from llamapro.runtime import ensure_ray

    started = ensure_ray("integration tests", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()


def _expand_tiny(d: Path, hidden: int | None = None, intermediate: int | None = None) -> Path:
    """``d/base``: a tiny random Llama (4 layers, every weight non-trivial); ``d/exp``: it expanded
    to 6 layers (new blocks at 2 and 5), proven (training refuses unproven expansions)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llamapro.expansion import api as steps
    from tests.tiny_models import tiny_config

    cfg = tiny_config("llama", num_layers=4)
    if hidden:
        cfg.hidden_size, cfg.intermediate_size = hidden, intermediate
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(d / "base")
    steps.expand(str(d / "base"), str(d / "exp"), blocks=2, strategy="even", progress=False)
    return d


@pytest.fixture(scope="session")
def expanded(tmp_path_factory):
    """The tiny Llama (hidden 32) in ``base`` and expanded 4 -> 6 layers in ``exp``; trained runs
    go beside them."""
    return _expand_tiny(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="session")
def expanded_q(tmp_path_factory):
    """The same with Linear inputs that are multiples of 64 (bitsandbytes' CPU 4-bit blocks)."""
    return _expand_tiny(tmp_path_factory.mktemp("trainq"), hidden=64, intermediate=128)


@pytest.fixture(scope="session")
def staged(ray_start_4_cpus, expanded):
    """A staged ZeRO-2 run on 2 workers: the bottom new block first (2 steps), then both (6 steps,
    the top one at 2x the LR). test_train.py checks it; test_grow_twice.py grows it again."""
    from tests.integration.training_helpers import train

    out, res = train(ray_start_4_cpus, expanded, "staged", num_stages=2, stage_ratios=[0.25, 0.75],
                     top_lr_scale=2.0, zero_stage=2, max_steps=8)
    assert res.error is None and res.metrics["final"]
    return out


@pytest.fixture(scope="session")
def zero3_reference(ray_start_4_cpus, expanded):
    """The uninterrupted ZeRO-3 run (one worker, ordered data) that every checkpoint fault is
    compared with: every checkpoint kept (steps 2, 4, 6, 8 mid-stage, 10 final). A dead run that
    resumes from any of them must go on with exactly its losses."""
    from tests.integration.training_helpers import ZERO3, events, train

    out, res = train(ray_start_4_cpus, expanded, "z3-ref", ordered=True, **ZERO3)
    assert res.error is None and res.metrics["final"]
    assert [s["zero_stage"] for s in events(out, "stage_start")] == [3]
    return out
