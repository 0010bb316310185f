"""Every command README.md shows, run: documentation and product cannot drift apart.

The ```bash blocks of README.md are parsed; each command must have an entry in ``COMMANDS``
(keyed by the command as README prints it, comment stripped, spaces collapsed), saying how it runs
here. Expansion, training (llamapro mode and the baselines), evaluation, export, fusion, strip and
the data commands run for real, in README's order, through the same ``llamapro`` entry point
(``llamapro.cli:main``, in-process: the imports are paid once) on a tiny random Llama with a real
character tokenizer and two small jsonl corpora, in a workspace where README's relative paths
(``jobs/configs/...``, ``runs/demo``) mean what they say. What cannot run on 2 CPU cores in a test
(the whole demo, a Tune experiment, Serve, a cloud cluster) has its arguments parsed and its config
loaded and checked, and every file it names must exist. A README command without an entry fails
the test with the list of commands to add.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block: continuation lines joined, comments stripped."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(" ".join(line.split()))
    return out


# --- the workspace ---------------------------------------------------------------------------------

TEXTS = [  # one per source of a config, in its order: a domain, a replayed set, a held-out set ...
    "apt-get install {n}: Debian packages live in /var/cache/apt/archives; dpkg -i unpacks "
    "package {n} and runs its maintainer scripts. ",
    "def f{n}(x):\n    return x * {n} + len(str(x))  # Python {n}\n",
    "my $x{n} = shift; print \"perl {n}\\n\" if $x{n} =~ /\\d+/; # Perl {n}\n",
    "SELECT {n} FROM t WHERE x > {n};  -- SQL {n}\n",
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from tests.unit.eval_support import make_base

    root = tmp_path_factory.mktemp("readme")
    (root / "jobs").symlink_to(REPO / "jobs", target_is_directory=True)
    base = make_base(root / "model", chat=True)
    for i, tmpl in enumerate(TEXTS):
        with open(root / f"corpus-{i}.jsonl", "w") as f:
            for n in range(300):
                f.write(json.dumps({"text": tmpl.format(n=n) * 3}) + "\n")
    train = ["expand.blocks=3", "train.max_tokens=0", "train.max_steps=3", "train.num_workers=1",
             "train.micro_batch_size=2", "train.eval_every=3", "train.eval_batches=1",
             "train.checkpoint_every=3", "train.patience=0"]
    ev = ["eval.max_blocks=2", "eval.max_prompts=2", "eval.max_new_tokens=4", "eval.batch_size=2"]
    return {"root": root, "base": str(base), "train": train, "eval": ev}


def tiny(ws, config) -> list[str]:
    """Overrides that keep a shipped config's shape (its sources by name and weight, its gate)
    but point it at the tiny model and small local corpora."""
    import yaml

    d = yaml.safe_load((REPO / config).read_text())
    srcs = (d.get("data") or {}).get("sources") or []
    assert len(srcs) <= len(TEXTS), f"{config} has {len(srcs)} sources: add texts to TEXTS"
    sources = [{"name": s["name"], "paths": [str(ws["root"] / f"corpus-{i}.jsonl")],
                "weight": s.get("weight", 1.0), "eval_fraction": 0.2} for i, s in enumerate(srcs)]
    out = [f"model.base={ws['base']}", "data.seq_len=24", "data.actors=1"]
    if sources:
        out.append("data.sources=" + json.dumps(sources))
    if ((d.get("eval") or {}).get("battery") or {}).get("enabled"):
        out.append("eval.battery.enabled=false")  # 4 benchmark tasks: tests/unit/test_battery.py
        if "max_accuracy_drop" in ((d.get("eval") or {}).get("gate") or {}):
            out.append("eval.gate.max_accuracy_drop=null")  # what gates the battery goes with it
    return out


def cli(ws, argv, ok=(0,)):
    """``llamapro ARGV`` in the workspace; its exit code must be in ``ok``."""
    import os

    from llamapro.cli import main

    cwd = os.getcwd()
    os.chdir(ws["root"])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    finally:
        os.chdir(cwd)
        sys.stderr.write(err.getvalue())
    assert code in ok, f"`llamapro {shlex.join(map(str, argv))}` exited {code}: {err.getvalue()[-3000:]}"
    return code


def parses(argv) -> None:
    """The arguments parse (argparse exits 2 with a usage message otherwise)."""
    from llamapro.cli import build_parser

    build_parser().parse_args([str(a) for a in argv])


def load(ws, path, overrides=()):
    from llamapro.config import load_config

    return load_config(ws["root"] / path, list(overrides))


def exists(*paths) -> None:
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"README names files that do not exist: {missing}"


def ray_cli(*args) -> None:
    """A `ray ...` command of README's cluster section: the subcommand exists in this Ray and
    takes these options (click parses them; nothing runs)."""
    import click
    from ray.scripts.scripts import cli as ray

    ctx = click.Context(ray)
    cmd, rest = ray, list(args)
    while isinstance(cmd, click.Group):
        sub = cmd.get_command(ctx, rest[0])
        assert sub is not None, f"`ray {' '.join(args)}`: this Ray has no `{rest[0]}` command"
        cmd, rest = sub, rest[1:]
        ctx = click.Context(cmd, parent=ctx)
    cmd.make_context(cmd.name, rest, parent=ctx)


# --- how each README command runs here --------------------------------------------------------------

def _scripts(ws):
    import subprocess

    for s in ("scripts/demo.sh", "scripts/test.sh", "scripts/setup.sh"):
        exists(s)
        assert subprocess.run(["bash", "-n", str(REPO / s)]).returncode == 0, f"{s}: syntax error"
    assert "llamapro run --config jobs/configs/demo.yaml" in (REPO / "scripts/demo.sh").read_text()
    parses(["run", "--config", "jobs/configs/demo.yaml"])
    load(ws, "jobs/configs/demo.yaml")


def _expand(ws):
    r, b = ws["root"], ws["base"]
    cli(ws, ["expand", b, r / "exp", "--blocks", 2, "--positions", "1,4", "-q"])
    for strategy in ("even", "top", "bottom", "middle"):  # the same path; tests/unit/test_expansion.py runs them
        parses(["expand", b, r / f"exp-{strategy}", "--blocks", 2, "--strategy", strategy])
    assert json.loads((r / "exp" / "llamapro.json").read_text())["new_layer_indices"] == [1, 4]


def _verify(ws):
    cli(ws, ["verify", ws["root"] / "exp", "--base", ws["base"], "--max-new-tokens", 4])
    parses(["verify", ws["root"] / "exp"])  # the recorded base: the same proof


def _strip(ws):
    cli(ws, ["strip", ws["root"] / "exp", ws["root"] / "restored", "-q"])


def _demo_model(ws, capsys):
    cli(ws, ["demo-model"])
    assert (Path(capsys.readouterr().out.strip().splitlines()[-1]) / "config.json").is_file()


def _train(ws):
    cli(ws, ["train", "--config", "jobs/configs/demo.yaml", *tiny(ws, "jobs/configs/demo.yaml"), *ws["train"],
             "train.zero_stage=3", "train.num_stages=1"])
    assert (ws["root"] / "runs/demo/model/llamapro.json").is_file()


def _train_baseline(ws):
    # the staged demo config with --mode: a one-stage baseline at the same budget, as run.baselines
    cli(ws, ["train", "--config", "jobs/configs/demo.yaml", *tiny(ws, "jobs/configs/demo.yaml"), *ws["train"],
             "--mode", "full"])
    assert (ws["root"] / "runs/demo/baseline-full/model/config.json").is_file()
    for mode in ("lora", "freeze_last_n"):
        parses(["train", "--config", "jobs/configs/demo.yaml", "--mode", mode])


def _tune(ws):
    from llamapro.tune import plan_experiment, training_yaml, trial_config

    argv = ["tune", "--config", "jobs/configs/tune_demo.yaml", "tune.num_samples=2", "--force"]
    parses(argv)
    cfg = load(ws, "jobs/configs/tune_demo.yaml", ["tune.num_samples=2", f"run.output_dir={ws['root']}/runs"])
    plan = plan_experiment(cfg, ws["root"])  # the space is checked against the demo model here
    best = ws["root"] / "runs/demo-tune/best.yaml"
    best.parent.mkdir(parents=True, exist_ok=True)
    best.write_text(training_yaml(trial_config(plan, {"expand.placement": "top"}, "best")))


def _train_best(ws):
    parses(["train", "--config", "runs/demo-tune/best.yaml"])
    assert load(ws, "runs/demo-tune/best.yaml").expand.strategy == "top"


def _corpora(ws):
    cli(ws, ["data", "corpora"])  # the suite's kept corpora: built once, then up to date


def _preview(ws, capsys):
    cli(ws, ["data", "preview", "--config", "jobs/configs/data_demo.yaml", *tiny(ws, "jobs/configs/data_demo.yaml"),
             "--json"])
    assert json.loads(capsys.readouterr().out)


def _eval(ws):
    # exit 4: the gate failed, as README says (3 random steps may go either way)
    code = cli(ws, ["eval", "--config", "jobs/configs/eval_demo.yaml", *tiny(ws, "jobs/configs/eval_demo.yaml"),
                    *ws["eval"], "-q"], ok=(0, 4))
    res = json.loads((ws["root"] / "runs/demo/eval/results.json").read_text())
    assert res["gate"]["passed"] == (code == 0)


def _export(ws):
    cli(ws, ["export", "runs/demo", "runs/demo-export", "-q"])
    cli(ws, ["export", "runs/demo", "runs/demo-export", "--force", "-q"])


def _strip_export(ws, capsys):
    cli(ws, ["strip", "runs/demo-export", "runs/demo-restored"])
    assert "bit for bit" in capsys.readouterr().out


def _compare(ws):
    sets = [a for o in (*tiny(ws, "jobs/configs/eval_demo.yaml"), *ws["eval"]) for a in ("--set", o)]
    cli(ws, ["compare", "--config", "jobs/configs/eval_demo.yaml", "--out", "runs/study",
             "llamapro=runs/demo", "full=runs/demo/baseline-full", *sets])
    assert (ws["root"] / "runs/study/compare.md").is_file() and (ws["root"] / "runs/study/pareto.png").is_file()


def _export_gguf(ws, capsys):
    # this workspace's tiny model has a character-level (WordLevel) tokenizer, which GGUF cannot
    # carry: the command runs and refuses it cleanly (exit 2, nothing written). The byte-level BPE
    # round trip through transformers is tests/unit/test_export_formats.py and the e2e on SmolLM2.
    cli(ws, ["export", "runs/demo", "runs/demo-gguf", "--format", "gguf", "--quant", "q8_0", "-q"], ok=(2,))
    assert "tokenizer" in capsys.readouterr().err.lower()
    assert not (ws["root"] / "runs/demo-gguf").exists()


def _export_int8(ws):
    cli(ws, ["export", "runs/demo", "runs/demo-int8", "--format", "torchao-int8", "-q"])
    assert "quantization_config" in json.loads((ws["root"] / "runs/demo-int8/config.json").read_text())


def _pack(ws):
    cli(ws, ["pack", "runs/demo", "runs/demo-pack"])
    assert json.loads((ws["root"] / "runs/demo-pack/pack.json").read_text())["positions"]


def _apply(ws):
    cli(ws, ["apply", ws["base"], "runs/demo-pack", "runs/demo-applied", "-q"])
    assert (ws["root"] / "runs/demo-applied/llamapro.json").is_file()


def _apply_stack(ws):
    # two sibling packs of the same base: untrained expansions at different gaps, packed by name
    for name, pos in (("math", "1"), ("med", "3")):
        cli(ws, ["expand", ws["base"], f"exp-{name}", "--blocks", 1, "--positions", pos, "-q"])
        cli(ws, ["pack", f"exp-{name}", f"{name}-pack"])
    cli(ws, ["apply", ws["base"], "math-pack", "med-pack", "runs/both", "-q"])
    assert len(json.loads((ws["root"] / "runs/both/llamapro.json").read_text())["new_layer_indices"]) == 2


def _strip_pack(ws):
    cli(ws, ["strip", "runs/both", "runs/med-only", "--pack", "math-pack", "-q"])
    assert len(json.loads((ws["root"] / "runs/med-only/llamapro.json").read_text())["new_layer_indices"]) == 1


def _fuse(*args):
    def run(ws):
        out = ws["root"] / "runs" / f"demo-fused-{len(list((ws['root'] / 'runs').glob('demo-fused*')))}"
        tail = list(args)
        extra = []
        if "--config" in tail:  # dotted overrides go right after OUT
            extra = [*tiny(ws, "jobs/configs/eval_demo.yaml"), *ws["eval"], "fuse.alphas=[0.0,1.0]"]
        cli(ws, ["fuse", "runs/demo", out, *extra, *tail, "-q"])
        assert (out / "llamapro.json").is_file()
    return run


def _serve(ws, capsys):
    argv = ["serve", "--config", "jobs/configs/serve_demo.yaml", f"serve.models.expanded.path={ws['base']}"]
    parses(argv)
    cli(ws, [*argv, "--print-serve-config"])
    assert "applications" in capsys.readouterr().out


def _serve_run(ws):
    import importlib

    mod, attr = "llamapro.serve:build_app".split(":")
    assert callable(getattr(importlib.import_module(mod), attr))


def _cluster(ws):
    exists("cluster.yaml", "cluster/runtime_env.yaml", "jobs/pipeline.py", "jobs/serve.py",
           "jobs/configs/serve_cluster.yaml")
    ray_cli("get-auth-token", "--generate")
    ray_cli("up", "cluster.yaml", "-y")
    ray_cli("dashboard", "cluster.yaml")
    ray_cli("down", "cluster.yaml", "-y")


def _job_submit(job, config, *overrides):
    def run(ws):
        import runpy

        ray_cli("job", "submit", "--address", "http://localhost:8265", "--working-dir", ".",
                "--runtime-env", "cluster/runtime_env.yaml", "--", "python", job, "--config", config)
        exists(job, config)
        load(ws, config, overrides)
        assert "main" in runpy.run_path(str(REPO / job), run_name="readme_check")
    return run


def _nothing(ws):
    """An environment setting: nothing to run."""


COMMANDS = {
    "bash scripts/demo.sh": _scripts,
    "bash scripts/test.sh": _scripts,
    "llamapro expand BASE OUT --blocks N [--strategy even|top|bottom|middle | --positions 5,11,...]": _expand,
    "llamapro verify OUT [--base BASE]": _verify,
    "llamapro strip OUT RESTORED": _strip,
    "llamapro demo-model": _demo_model,
    "llamapro train --config jobs/configs/demo.yaml [train.zero_stage=3 train.num_stages=1 ...]": _train,
    "llamapro train --config jobs/configs/demo.yaml --mode full": _train_baseline,
    "llamapro tune --config jobs/configs/tune_demo.yaml [tune.num_samples=2 ...] [--force]": _tune,
    "llamapro train --config runs/demo-tune/best.yaml": _train_best,
    "llamapro data corpora": _corpora,
    "llamapro data preview --config jobs/configs/data_demo.yaml [--json]": _preview,
    "llamapro eval --config jobs/configs/eval_demo.yaml": _eval,
    "llamapro export runs/demo runs/demo-export [--force]": _export,
    "llamapro strip runs/demo-export runs/demo-restored": _strip_export,
    "llamapro fuse runs/demo runs/demo-fused --method residual": _fuse("--method", "residual"),
    "llamapro fuse runs/demo runs/demo-fused --method weighted --alpha 0.5":
        _fuse("--method", "weighted", "--alpha", "0.5"),
    "llamapro fuse runs/demo runs/demo-fused --method weighted --alpha auto --config jobs/configs/eval_demo.yaml":
        _fuse("--method", "weighted", "--alpha", "auto", "--config", "jobs/configs/eval_demo.yaml"),
    "llamapro compare --config jobs/configs/eval_demo.yaml --out runs/study llamapro=runs/demo "
    "full=runs/demo/baseline-full": _compare,
    "llamapro export runs/demo runs/demo-gguf --format gguf --quant q8_0": _export_gguf,
    "llamapro export runs/demo runs/demo-int8 --format torchao-int8": _export_int8,
    "llamapro pack runs/demo runs/demo-pack": _pack,
    "llamapro apply BASE runs/demo-pack runs/demo-applied": _apply,
    "llamapro apply BASE math-pack med-pack runs/both": _apply_stack,
    "llamapro strip runs/both runs/med-only --pack math-pack": _strip_pack,
    "llamapro serve --config jobs/configs/serve_demo.yaml": _serve,
    "serve run llamapro.serve:build_app": _serve_run,
    "ray get-auth-token --generate && ray up cluster.yaml -y && ray dashboard cluster.yaml &": _cluster,
    "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/auth_token": _nothing,
    "ray job submit --address http://localhost:8265 --working-dir . --runtime-env cluster/runtime_env.yaml "
    "-- python jobs/pipeline.py --config jobs/configs/demo.yaml run.output_dir=s3://my-bucket/runs":
        _job_submit("jobs/pipeline.py", "jobs/configs/demo.yaml", "run.output_dir=s3://my-bucket/runs"),
    "ray job submit --address http://localhost:8265 --working-dir . --runtime-env cluster/runtime_env.yaml "
    "-- python jobs/serve.py --config jobs/configs/serve_cluster.yaml":
        _job_submit("jobs/serve.py", "jobs/configs/serve_cluster.yaml"),
    "ray down cluster.yaml -y": _cluster,
}


def test_readme_shows_commands():
    cmds = readme_commands(README.read_text())
    assert "llamapro train --config jobs/configs/demo.yaml --mode full" in cmds
    assert len(cmds) >= 20


def test_every_readme_command_runs(ws, capsys):
    import inspect

    cmds = readme_commands(README.read_text())
    unknown = [c for c in cmds if c not in COMMANDS]
    assert not unknown, (
        "README.md shows commands this test does not know how to run; add an entry for each to "
        "COMMANDS in tests/integration/test_readme_commands.py (run it for real on the tiny "
        "workspace, or parse and load it where that is infeasible):\n  " + "\n  ".join(unknown))
    import ray

    import sys
    import time

    ours = not ray.is_initialized()  # the first training command starts the local cluster
    done, took = set(), []
    try:
        for c in cmds:
            fn = COMMANDS[c]
            if fn in done:  # one check covers several lines (e.g. ray up ... ray down)
                continue
            done.add(fn)
            t0 = time.perf_counter()
            try:
                fn(ws, capsys) if "capsys" in inspect.signature(fn).parameters else fn(ws)
            except BaseException as e:
                raise AssertionError(f"README command `{c}` failed: {e}") from e
            capsys.readouterr()
            took.append(f"{time.perf_counter() - t0:6.1f} s  {c}")
    finally:
        if ours and ray.is_initialized():
            ray.shutdown()
        with capsys.disabled():  # where the time goes (-s shows it)
            print("\n" + "\n".join(took), file=sys.stderr)
