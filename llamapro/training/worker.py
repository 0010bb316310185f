"""What each Ray Train worker runs: :class:`TrainRecipe`, read top to bottom.

``setup`` prepares the process (threads, seed, compute dtype), the schedule of stages, the state
resumed from Ray Train's newest intact checkpoint (:mod:`llamapro.training.resume`: validated against
its manifests, never unpickled) and the data; ``train`` runs the stages: for each, the
model is loaded afresh with the carried trained tensors, only the stage's parameters are handed to
DeepSpeed, and the steps run with held-out evaluation, early stopping and periodic checkpoints;
after the last stage rank 0 writes the HF checkpoint (:mod:`llamapro.training.output`); ``cleanup``
removes the resumed checkpoint's local copy. ``train_loop`` is the function Ray Train calls.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from llamapro import storage
from llamapro.config import from_dict
from llamapro.config.train import TrainConfig
from llamapro.errors import CheckpointError
from llamapro.expansion.surgery import skip_layers
from llamapro.jsonl import append_record
from llamapro.training.compile import compile_choice, compile_layers, eager
from llamapro.training.loss import (
    causal_lm_ce_sum,
    kl_to_teacher,
    masked_ce_sum,
    supports_chunked_loss,
)
from llamapro.training.memory import lean_malloc, peak_rss, rss
from llamapro.training.model import (
    gather_trainable,
    load_model,
    overlay_trained,
    uses_lora,
    wrap_lora,
)
from llamapro.training.optim import build_ds_config, lr_lambda, optimizer_state_numel
from llamapro.training.output import write_final
from llamapro.training.params import (
    apply_checkpointing,
    fp32_trainable,
    hold_frozen_in,
    select_parameters,
)
from llamapro.training.precision import agree_across_workers, resolve_dtype
from llamapro.training.resume import (
    STATE_FILE,
    TRAINED_FILE,
    deepspeed_safe_loading,
    resume_from_ray,
    write_manifest,
    writing_checkpoint,
)
from llamapro.training.stages import allocate, build_stages


class _Batches:
    """Endless micro-batches from this worker's shard (each pass re-runs the Ray Data stream)."""

    def __init__(self, shard, mbs: int):
        self.shard, self.mbs, self.it, self.epoch = shard, mbs, None, 0

    def next(self):
        while True:
            if self.it is None:
                self.it = iter(self.shard.iter_torch_batches(
                    batch_size=self.mbs, drop_last=True, dtypes=torch.long))
            try:
                b = next(self.it)
                return b["input_ids"], b["labels"]
            except StopIteration:
                self.it, self.epoch = None, self.epoch + 1
                if self.epoch > 10_000:
                    raise RuntimeError("the training stream yields no full batch")

    def skip(self, n: int) -> None:
        for _ in range(n):
            self.next()


class TrainRecipe:
    """Staged training of one worker. The state that a checkpoint carries is ``self.state`` (a
    JSON dict) and ``self.trained`` (the trained tensors of the stages done, by parameter name)."""

    def __init__(self, config: dict):
        self.config = config
        self.tc = from_dict(TrainConfig, config["train"], "train")

    # --- setup --------------------------------------------------------------------------------------

    def setup(self) -> None:
        self.setup_process()
        self.setup_precision()
        self.setup_paths()
        self.setup_schedule()
        self.load_checkpoint()
        self.setup_data()

    def setup_process(self) -> None:
        import ray.train

        tc = self.tc
        if tc.lean_malloc:
            lean_malloc()
        self.rss_at_start = rss()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(max(1, tc.cpus_per_worker))
        torch.manual_seed(self.config["seed"] + self.rank)
        use_cuda = tc.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda", ctx.get_local_rank()) if use_cuda else torch.device("cpu")

    def setup_precision(self) -> None:
        tc = self.tc
        compute_dtype, dtype_info = resolve_dtype(tc.dtype, self.device)
        if tc.dtype == "auto" and self.world > 1:
            compute_dtype = agree_across_workers(compute_dtype, dtype_info)
        self.bf16 = compute_dtype == torch.bfloat16
        # bf16: autocast over fp32 trainable blocks and bf16 frozen weights (measured faster than
        # DeepSpeed's bf16 mode, which also keeps the activations' elementwise work in bf16 and a
        # flat fp32 copy). ZeRO-3 partitions every parameter, frozen ones too: there DeepSpeed's own
        # bf16 mode does the casting.
        self.ds_bf16 = self.bf16 and tc.zero_stage == 3
        dtype_info.update(frozen_weights="bfloat16" if self.bf16 else "float32", trainable_weights=(
            "bfloat16 (fp32 master in the optimizer)" if self.ds_bf16 else "float32"),
            method="deepspeed bf16" if self.ds_bf16 else "torch.autocast" if self.bf16 else "none")
        self.dtype_info = dtype_info
        self.say(f"compute dtype {dtype_info['compute']} ({dtype_info['reason']})")

    def setup_paths(self) -> None:
        config = self.config
        self.out_uri = config.get("out_uri")
        if config.get("model_uri"):  # no shared file system: each node keeps its own copy
            config["model_dir"] = storage.localize(config["model_uri"])
        if self.out_uri:  # this node's working copy of the run; rank 0 uploads what it writes there
            config["out_dir"] = str(storage.local_dir(self.out_uri))
        self.model_dir, self.out_dir = config["model_dir"], Path(config["out_dir"])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.new_layers = config["new_layers"]
        self.seq_len = config["seq_len"]

    def setup_schedule(self) -> None:
        tc = self.tc
        self.stages = allocate(build_stages(self.new_layers or [0], tc.num_stages, tc.stage_ratios,
                                            tc.top_lr_scale, tc.cumulative, tc.final_originals_ratio)
                               if tc.mode == "llamapro" else build_stages([0]), tc.total_steps(self.seq_len))
        self.state = {"stage": 0, "step_in_stage": 0, "global_step": 0, "tokens": 0, "ds_valid": False,
                      "best_eval": None, "bad_evals": 0, "early_stopped": [], "elapsed": 0.0}
        self.trained: dict = {}
        self.resume_dir = None

    def load_checkpoint(self) -> None:
        """Resume from the newest intact checkpoint Ray Train kept, if any (a corrupt or incomplete
        newer one is skipped and named): the state, the trained tensors, and (rank 0) the metrics
        log so far with a ``checkpoint_rejected`` record per skipped one and a ``resume`` record."""
        from safetensors.torch import load_file

        resumed = resume_from_ray(self.rank)
        if resumed is None:
            return
        self.resume_dir = resume_dir = resumed.local_dir
        self.state = state = json.loads((resume_dir / STATE_FILE).read_text())
        if (resume_dir / TRAINED_FILE).is_file():
            self.trained = load_file(resume_dir / TRAINED_FILE)
        if self.rank == 0:
            if self.out_uri:  # this node may not be the one that wrote the metrics so far
                storage.download(storage.join(self.out_uri, "metrics.jsonl"), self.metrics_path)
            for source, why in resumed.rejected:
                append_record(self.metrics_path, {"event": "checkpoint_rejected", "checkpoint": source,
                                                  "reason": why})
                self.say(f"WARNING: skipping checkpoint {source}: {why}")
            append_record(self.metrics_path, {"event": "resume", "step": state["global_step"],
                                              "stage": state["stage"], "checkpoint": resumed.source})
            self.say(f"resuming at stage {state['stage']} step {state['step_in_stage']} "
                     f"(global step {state['global_step']}) from {resumed.source}")

    def setup_data(self) -> None:
        import ray.train

        tc, config, state = self.tc, self.config, self.state
        # lets an operator (or a test) find and kill a worker process
        (self.out_dir / f"worker-{self.rank}.pid").write_text(str(os.getpid()))
        self.eval_sets = {k: (np.asarray(v["input_ids"]), np.asarray(v["labels"]))
                          for k, v in config["eval_sets"].items()}
        self.primary = config.get("early_stop_on") or (next(iter(self.eval_sets)) if self.eval_sets else None)
        self.batches = _Batches(ray.train.get_dataset_shard("train"), tc.micro_batch_size)
        self.tokens_per_step = tc.micro_batch_size * tc.grad_accum * self.world * self.seq_len
        # every optimizer step drew grad_accum micro-batches on each worker: on resume, go past them
        consumed = state["global_step"] * tc.grad_accum
        if self.resume_dir is not None and consumed and tc.resume_data_skip:
            t_skip = time.perf_counter()
            self.batches.skip(consumed)
            self.log({"event": "data_skip", "step": state["global_step"], "micro_batches_per_worker": consumed,
                      "epoch": self.batches.epoch, "seconds": round(time.perf_counter() - t_skip, 3)})
            self.say(f"skipped the {consumed} micro-batches per worker trained on before the "
                     f"checkpoint ({time.perf_counter() - t_skip:.1f}s)")

    # --- one stage's model and engine ---------------------------------------------------------------

    def setup_model(self, stage):
        """The model this stage trains, with the trained tensors carried over and only the stage's
        parameters trainable; returns it and its optimizer param groups."""
        tc, trained = self.tc, self.trained
        lora = uses_lora(tc)
        # bf16 without LoRA: load straight in bf16 (no fp32 copy of the frozen majority, ever),
        # then the trainable parameters get their exact fp32 values below
        direct = self.bf16 and not self.ds_bf16 and not lora
        model = load_model(self.model_dir, torch.bfloat16 if direct else torch.float32,
                           self.config.get("trust_remote_code", False),
                           quantize_base=tc.quantize_base, new_layers=self.new_layers)
        if lora:
            model = wrap_lora(model, tc, list(stage.layers))
            overlay_trained(model, {("base_model.model." + n if not n.startswith("base_model") else n): v
                                    for n, v in trained.items()} if trained else {})
        else:
            overlay_trained(model, trained)
        groups = select_parameters(model, tc, self.new_layers, stage if tc.mode == "llamapro" else None)
        if direct:
            fp32_trainable(model, self.model_dir, trained)
        elif self.bf16 and not self.ds_bf16:
            hold_frozen_in(model, torch.bfloat16)
            gc.collect()
        checkpointing = tc.gradient_checkpointing
        if checkpointing == "auto":  # bf16 activations are half as big: keeping them pays
            checkpointing = "off" if self.bf16 else "frozen"
        self.checkpointing = checkpointing
        self.checkpointed = apply_checkpointing(model, checkpointing)
        self.chunked = (tc.chunked_loss and tc.zero_stage < 3 and tc.distill_weight == 0
                        and supports_chunked_loss(model))
        on, why = compile_choice(
            tc.compile, bf16_autocast=self.bf16 and not self.ds_bf16, zero3=tc.zero_stage == 3, lora=lora,
            quantized=tc.quantize_base != "none", distill=tc.distill_weight > 0, checkpointing=checkpointing,
            n_params=sum(p.numel() for p in model.parameters()),
            total_steps=sum(s.steps for s in self.stages))
        if on:
            compile_layers(model)
        self.compiled = {"on": on, "reason": why}
        return model, groups

    def setup_engine(self, model, groups, stage, k: int):
        """AdamW over ``groups`` with the stage's LR schedule, wrapped by DeepSpeed (restored from
        the resumed checkpoint when it was taken inside this stage)."""
        import deepspeed

        tc, state = self.tc, self.state
        for g in groups:
            g["initial_lr"] = g["lr"]
        optimizer = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.95))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(stage.steps, tc.warmup_ratio, tc.min_lr_ratio))
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=build_ds_config(tc, self.ds_bf16), dist_init_required=False)
        if self.resume_dir is not None and state["ds_valid"] and state["stage"] == k:
            with deepspeed_safe_loading(engine):  # weights_only: a checkpoint never runs code
                path, _ = engine.load_checkpoint(str(self.resume_dir / "ds"), tag="state",
                                                 load_module_strict=False)
            if path is None:  # DeepSpeed only warns when it finds nothing to load
                raise CheckpointError(f"DeepSpeed found no state to restore in {self.resume_dir / 'ds'}")
        return engine, optimizer, scheduler

    # --- training -----------------------------------------------------------------------------------

    def train(self) -> None:
        for k in range(self.state["stage"], len(self.stages)):
            self.train_stage(k)

    def train_stage(self, k: int) -> None:
        tc, state, stage = self.tc, self.state, self.stages[k]
        model, groups = self.setup_model(stage)
        n_train = sum(p.numel() for g in groups for p in g["params"])
        n_all = sum(p.numel() for p in model.parameters())
        group_sizes = {g["name"]: sum(p.numel() for p in g["params"]) for g in groups}
        engine, optimizer, scheduler = self.setup_engine(model, groups, stage, k)
        self.say(f"stage {k + 1}/{len(self.stages)} {stage.name}: layers "
                 f"{stage.layers if tc.mode == 'llamapro' else tc.mode} "
                 f"trainable {n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M params, {stage.steps} steps, "
                 f"ZeRO-{tc.zero_stage}, compiled layers: {'yes' if self.compiled['on'] else 'no'} "
                 f"({self.compiled['reason']})")
        self.log({"event": "stage_start", "stage": k, "name": stage.name, "layers": stage.layers,
                  "steps": stage.steps, "trainable_params": n_train, "total_params": n_all,
                  "optimizer_groups": group_sizes, "checkpointing": self.checkpointing,
                  "quantized_base": getattr(model, "llamapro_quantized", None),
                  "checkpointed_layers": self.checkpointed, "compile": self.compiled,
                  "chunked_loss": self.chunked, "zero_stage": engine.zero_optimization_stage(),
                  "dtype": self.dtype_info, "rss_at_start_bytes": self.rss_at_start, "rss_bytes": rss(),
                  "peak_rss_bytes": peak_rss()})
        engine.train()
        stopped, metrics = False, {"step": state["global_step"], "stage": k}
        while state["step_in_stage"] < stage.steps and not stopped:
            loss, kl, step_s, data_s, cpu_s = self.train_step(engine)
            if state["step_in_stage"] == 0:
                self.log({"event": "optimizer_state", "stage": k,
                          "numel": optimizer_state_numel(optimizer), "trainable_params": n_train})
            state["step_in_stage"] += 1
            state["global_step"] += 1
            state["tokens"] += self.tokens_per_step
            state["elapsed"] += step_s
            lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(getattr(optimizer, "param_groups", []))}
            rec = {"event": "step", "step": state["global_step"], "stage": k, "loss": loss,
                   "tokens": state["tokens"], "tokens_per_s": self.tokens_per_step / step_s, "step_s": step_s,
                   "lr": lrs, "data_s": data_s, "cpu_s": cpu_s,
                   "peak_rss_bytes": peak_rss(), "rss_bytes": rss()}
            if tc.distill_weight > 0:
                rec["kl"] = kl
            self.log(rec)
            self.say(f"step {state['global_step']:>4} stage {k} loss {loss:.4f} "
                     f"{self.tokens_per_step / step_s:,.0f} tok/s")
            end_of_stage = state["step_in_stage"] >= stage.steps
            metrics = {"step": state["global_step"], "stage": k, "loss": loss, "tokens": state["tokens"]}
            if self.eval_sets and (state["global_step"] % tc.eval_every == 0 or end_of_stage):
                stopped = self.evaluate_and_stop(engine, k, metrics, end_of_stage)
            if state["global_step"] % tc.checkpoint_every == 0 and not (end_of_stage or stopped):
                self.save_checkpoint(engine, metrics, ds_valid=True)
        # stage end: carry the trained weights to the next stage
        current = gather_trainable(engine, tc.zero_stage)
        if not uses_lora(tc):
            self.trained.update({n.replace("base_model.model.", ""): v for n, v in current.items()})
        else:
            self.trained.update(current)
        state.update(stage=k + 1, step_in_stage=0, bad_evals=0, best_eval=state["best_eval"])
        final = k == len(self.stages) - 1
        self.save_checkpoint(engine, dict(metrics, stage_done=k, final=final), ds_valid=False)
        # free this stage's model before the next one (or the final checkpoint) loads another
        del engine, optimizer, model, scheduler, groups, current
        gc.collect()
        if final and self.rank == 0:
            write_final(self.config, tc, self.trained, state, self.stages, self.dtype_info)

    def train_step(self, engine) -> tuple[float, float, float, float, float]:
        """One optimizer step (grad_accum micro-batches); returns the mean loss, the mean KL to the
        teacher (0 without distillation), and the step's wall, data-wait and CPU seconds."""
        tc, device, autocast = self.tc, self.device, self.autocast
        t0, c0 = time.perf_counter(), time.process_time()
        loss_acc, kl_acc, data_s = 0.0, 0.0, 0.0
        for _ in range(tc.grad_accum):
            td = time.perf_counter()
            x, y = self.batches.next()
            data_s += time.perf_counter() - td
            x, y = x.to(device), y.to(device)
            with autocast():
                if self.chunked:
                    s, n = causal_lm_ce_sum(engine.module, x, y, chunked=True)
                else:
                    out = engine(input_ids=x, use_cache=False)
                    s, n = masked_ce_sum(out.logits, y)
            loss = s / max(1, n)
            if tc.distill_weight > 0:
                with torch.no_grad(), skip_layers(engine.module, self.new_layers), autocast():
                    teacher = engine.module(input_ids=x).logits
                kl = kl_to_teacher(out.logits, teacher, y, tc.distill_temperature)
                loss = loss + tc.distill_weight * kl
                kl_acc += kl.item() / tc.grad_accum
            engine.backward(loss)
            engine.step()
            loss_acc += loss.item() / tc.grad_accum
        return loss_acc, kl_acc, time.perf_counter() - t0, data_s, time.process_time() - c0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16 and not self.ds_bf16)

    # --- evaluation ---------------------------------------------------------------------------------

    def evaluate(self, engine) -> dict:
        """Mean held-out loss per set, over every worker's rows."""
        tc, rank, world = self.tc, self.rank, self.world
        engine.module.eval()
        out = {}
        with torch.no_grad(), eager():
            for name, (ids, labels) in self.eval_sets.items():
                # rows dealt round-robin: a set with fewer rows than workers is still scored whole
                # (contiguous shares of len // world rows gave every rank none, and a loss of 0.0)
                n_rows = tc.eval_batches * tc.micro_batch_size
                tot = torch.zeros(2, dtype=torch.float64)
                x = torch.as_tensor(ids[rank::world][:n_rows])
                y = torch.as_tensor(labels[rank::world][:n_rows])
                for i in range(0, len(x), tc.micro_batch_size):
                    with self.autocast():
                        s, n = causal_lm_ce_sum(engine.module, x[i:i + tc.micro_batch_size].to(self.device),
                                                y[i:i + tc.micro_batch_size].to(self.device), self.chunked)
                    tot += torch.tensor([s.item(), n], dtype=torch.float64)
                dist.all_reduce(tot)
                out[name] = (tot[0] / tot[1].clamp_min(1)).item()
        engine.module.train()
        return out

    def evaluate_and_stop(self, engine, k: int, metrics: dict, end_of_stage: bool) -> bool:
        """Evaluate, add the losses to ``metrics``, and say whether the stage stops early (the
        primary set's loss did not improve for ``patience`` evaluations)."""
        tc, state, primary = self.tc, self.state, self.primary
        ev = self.evaluate(engine)
        metrics.update({f"eval_loss/{n}": v for n, v in ev.items()})
        self.log({"event": "eval", "step": state["global_step"], "stage": k, "eval_loss": ev})
        self.say(f"eval step {state['global_step']}: " + ", ".join(f"{n} {v:.4f}" for n, v in ev.items()))
        cur = ev.get(primary)
        if cur is None:
            return False
        if state["best_eval"] is None or cur < state["best_eval"] - 1e-4:
            state["best_eval"], state["bad_evals"] = cur, 0
            return False
        state["bad_evals"] += 1
        if tc.patience and state["bad_evals"] >= tc.patience and not end_of_stage:
            state["early_stopped"].append(k)
            self.log({"event": "early_stop", "step": state["global_step"], "stage": k})
            self.say(f"early stop of stage {k}: {primary} held-out loss "
                     f"did not improve for {tc.patience} evaluations")
            return True
        return False

    # --- checkpoint, log, cleanup -------------------------------------------------------------------

    def save_checkpoint(self, engine, metrics: dict, ds_valid: bool) -> None:
        """Report ``metrics`` to Ray Train with a checkpoint: DeepSpeed's state when ``ds_valid``
        (mid-stage), from rank 0 the state and the carried trained tensors, and last each rank's
        manifest of what it wrote (what resume checks a checkpoint against)."""
        import ray.train
        from safetensors.torch import save_file

        config, rank = self.config, self.rank
        if config.get("report_metrics") is not None:  # e.g. the Tune objective (llamapro.tune)
            metrics = {**metrics, **config["report_metrics"](metrics)}
        d = Path(tempfile.mkdtemp(prefix="llamapro-ckpt-"))
        # a full disk mid-checkpoint: one error that says so (not DeepSpeed's traceback), and the
        # temporary is not left behind
        try:
            with writing_checkpoint(d, self.state["global_step"]):
                if ds_valid:
                    engine.save_checkpoint(str(d / "ds"), tag="state", exclude_frozen_parameters=True)
                if rank == 0:
                    st = dict(self.state, ds_valid=ds_valid)
                    (d / STATE_FILE).write_text(json.dumps(st))
                    if self.trained:
                        save_file({k: v.contiguous() for k, v in self.trained.items()}, str(d / TRAINED_FILE))
                write_manifest(d, rank, self.world, self.state["global_step"])
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))
        finally:
            shutil.rmtree(d, ignore_errors=True)
        if rank == 0 and self.out_uri and self.metrics_path.is_file():  # progress beside the checkpoints
            storage.upload(self.metrics_path, storage.join(self.out_uri, "metrics.jsonl"))

    def log(self, rec: dict) -> None:
        if self.rank == 0:
            append_record(self.metrics_path, rec)  # a full disk leaves no half line to merge

    def say(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[llamapro] {msg}", flush=True)

    def cleanup(self) -> None:
        if self.resume_dir is not None:
            shutil.rmtree(self.resume_dir, ignore_errors=True)


def train_loop(config: dict) -> None:
    """Ray Train's per-worker entry point (``config`` is the driver's ``train_loop_config``)."""
    recipe = TrainRecipe(config)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
