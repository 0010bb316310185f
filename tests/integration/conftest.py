"""One fixture owns the local Ray cluster of the integration session (after Ray's own
``python/ray/train/tests/conftest.py::ray_start_4_cpus``, but session-scoped: starting Ray costs
seconds here, so every test shares one cluster).

Four logical CPUs on this 2-core machine on purpose: two Train-style consumers hold one CPU each
and Ray Data's tokenizer actors need the rest. With ``num_cpus=2`` the actors never start and
nothing errors (Ray Data starves silently).
"""

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
