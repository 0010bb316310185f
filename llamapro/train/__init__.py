"""Ray Train + DeepSpeed on only the inserted blocks, with staged unfreezing.

Reads top to bottom: the driver (``run_training``) builds a ``TorchTrainer``; each worker
(``train_loop``) loads the expanded checkpoint, and for each stage of the schedule marks the
stage's parameters trainable (read from the checkpoint's metadata, never guessed from a stride),
hands DeepSpeed only those, trains its share of the budget with held-out evaluation and early
stopping, checkpoints, and finally rank 0 writes a standard HF checkpoint.

This is the only module that imports ``ray.train`` and ``deepspeed``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llamapro import storage
from llamapro.checkpoint import METADATA_FILE, METADATA_VERSION, atomic_dir, copy_side_files, read_metadata
from llamapro.config import from_dict
from llamapro.train.loss import causal_lm_ce_sum, masked_ce_sum, supports_chunked_loss  # noqa: F401
from llamapro.jsonl import append_record
from llamapro.train.stages import allocate, build_stages
from llamapro.config.train import TrainConfig
from llamapro.errors import TrainingError

STATE_FILE = "trainer_state.json"
TRAINED_FILE = "trained.safetensors"


# --- pure helpers (no distribution) ---------------------------------------------------------------

def layer_prefix(model) -> str:
    from llamapro.expand.surgery import find_layers

    return find_layers(model)[0] + "."


def _module_matches(rest: str, modules: list[str]) -> bool:
    if "all" in modules:
        return True
    for m in modules:
        if m == "attn" and rest.split(".")[0] in ("self_attn", "attention", "attn"):
            return True
        if m == "mlp" and rest.split(".")[0] in ("mlp", "block_sparse_moe", "feed_forward"):
            return True
        if rest == m or rest.startswith(m + "."):
            return True
    return False


def select_parameters(model, tc: TrainConfig, new_layers, stage=None) -> list[dict]:
    """Set ``requires_grad`` for this mode/stage and return optimizer param groups.

    Every group has ``lr`` (its peak) and ``name``. Everything not returned is frozen, so autograd
    keeps no weight gradients and DeepSpeed no optimizer state for it.
    """
    prefix = layer_prefix(model)
    n_layers = model.config.num_hidden_layers
    groups: dict[str, dict] = {}

    def add(key, lr, p):
        p.requires_grad_(True)
        groups.setdefault(key, {"name": key, "lr": lr, "params": []})["params"].append(p)

    for p in model.parameters():
        p.requires_grad_(False)
    lora = any("lora_" in n for n, _ in model.named_parameters())
    for name, p in model.named_parameters():
        clean = name.replace("base_model.model.", "")
        layer, rest = None, clean
        if clean.startswith(prefix):
            idx, _, rest = clean[len(prefix):].partition(".")
            layer = int(idx)
        if lora:  # peft marks what trains; keep exactly the adapters
            if "lora_" in name:
                add("lora", tc.lr, p)
            continue
        if tc.mode == "full":
            add("all", tc.lr, p)
            continue
        if tc.mode == "freeze_last_n":
            if layer is not None and layer >= n_layers - tc.freeze_last_n:
                add("last_n", tc.lr, p)
            continue
        # mode llamapro
        if layer is not None and stage is not None and layer in stage.layers:
            if _module_matches(rest, tc.trainable_modules):
                s = stage.lr_scale.get(layer, 1.0)
                add(f"new_x{s:g}", tc.lr * s, p)
            continue
        if layer is not None and layer not in set(new_layers):
            if tc.original_lr > 0 and (stage is None or stage.train_originals or tc.final_originals_ratio == 0):
                add("originals", tc.original_lr, p)
            continue
        if layer is None:
            is_norm = "norm" in clean
            is_emb = "embed" in clean or (clean.startswith("lm_head") and model.config.tie_word_embeddings)
            if (is_norm and tc.train_norms) or (is_emb and tc.train_embeddings) or \
               (clean.startswith("lm_head") and tc.train_lm_head):
                add("extra", tc.lr, p)
    return list(groups.values())


def build_ds_config(tc: TrainConfig, bf16: bool) -> dict:
    """The DeepSpeed config as a pure function of the typed config; a user's JSON overrides it."""
    cfg = {
        "train_micro_batch_size_per_gpu": tc.micro_batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "gradient_clipping": tc.max_grad_norm,
        # one worker has nothing to partition: ZeRO-1/2 would only add flat fp32 buffers (measured:
        # +0.2 GB peak on SmolLM2), so a single worker runs stage 0; ZeRO-3 stays (offload users)
        "zero_optimization": {"stage": tc.zero_stage if tc.num_workers > 1 or tc.zero_stage == 3 else 0},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg["zero_optimization"]["stage"] in (1, 2):
        # buckets sized for the trainable subset: 5e6 elements (20 MB fp32) instead of DeepSpeed's
        # 5e8, whose contiguous-gradient buffer alone would outweigh a small model's new blocks
        cfg["zero_optimization"].update({"overlap_comm": False, "contiguous_gradients": True,
                                         "reduce_bucket_size": 5e6, "allgather_bucket_size": 5e6})
    if tc.deepspeed_config:
        user = json.loads(Path(tc.deepspeed_config).read_text())
        _deep_update(cfg, user)
    return cfg


def _deep_update(a: dict, b: dict) -> None:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _deep_update(a[k], v)
        else:
            a[k] = v


def lr_lambda(steps: int, warmup_ratio: float, min_ratio: float):
    warm = int(steps * warmup_ratio)

    def f(step):
        if warm and step < warm:
            return (step + 1) / warm
        prog = (step - warm) / max(1, steps - warm)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))

    return f


def kl_to_teacher(student_logits, teacher_logits, labels, temperature: float) -> torch.Tensor:
    mask = (labels[:, 1:] != -100).reshape(-1)
    s = F.log_softmax(student_logits[:, :-1].float() / temperature, -1).reshape(-1, student_logits.shape[-1])
    t = F.log_softmax(teacher_logits[:, :-1].float() / temperature, -1).reshape(-1, teacher_logits.shape[-1])
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1) * temperature**2


# --- compute dtype ----------------------------------------------------------------------------------

def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _matmul_seconds(dtype, n: int = 512, reps: int = 5) -> float:
    """Best of ``reps`` times of an (n x 2n) @ (2n x 2n) matmul: the best time filters out other
    processes' bursts on a shared machine."""
    a, b = torch.randn(n, 2 * n).to(dtype), torch.randn(2 * n, 2 * n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Does ``device`` compute bf16 matmuls natively (fast), and why we think so.

    CUDA: the device's own answer (emulated bf16 on pre-Ampere GPUs counts as no). CPU: oneDNN must
    support bf16 at all (``torch.ops.mkldnn._is_mkldnn_bf16_supported``, true on any AVX-512 core,
    where bf16 may still be emulated); the CPU's avx512_bf16 / amx_bf16 flags then say native, and
    without them a timed probe decides: bf16 must beat fp32 by 1.5x
    on a 512 x 1024 x 1024 matmul (native AVX512-BF16 / AMX: 3-6x; emulated: slower than fp32;
    AVX2 only: ~100x slower, never timed)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"cuda {torch.cuda.get_device_name(device)}: bf16 {'native' if ok else 'not native'}"
    cap = torch.backends.cpu.get_cpu_capability()
    flags = sorted(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    if not onednn:
        return False, f"cpu {cap}, flags {flags or 'no bf16 flags'}: oneDNN has no bf16 kernels here"
    if flags:  # the instructions themselves: a timed probe on a loaded machine measured 1.5x here
        return True, f"cpu {cap}, flags {flags}: native bf16 instructions, oneDNN bf16 kernels"
    f32, b16 = _matmul_seconds(torch.float32), _matmul_seconds(torch.bfloat16)
    ok = f32 / b16 >= 1.5
    return ok, (f"cpu {cap}, flags {flags or 'no bf16 flags'}: bf16 matmul {f32 / b16:.1f}x fp32 "
                f"({'>=' if ok else '<'} 1.5x)")


def resolve_dtype(requested: str, device: torch.device) -> tuple[torch.dtype, dict]:
    """The compute dtype of a run and the record of why (for the log and the metadata)."""
    if requested == "float32":
        return torch.float32, {"compute": "float32", "requested": requested, "reason": "configured"}
    native, why = native_bf16(device)
    if requested == "bfloat16":
        reason = "configured" + ("" if native else f"; WARNING bf16 is not native here, expect a slow run ({why})")
        return torch.bfloat16, {"compute": "bfloat16", "requested": requested, "reason": reason, "probe": why}
    dtype = torch.bfloat16 if native else torch.float32
    return dtype, {"compute": str(dtype).replace("torch.", ""), "requested": requested,
                   "reason": f"auto: {why}", "probe": why}


def _fp32_trainable(model, model_dir: str, trained: dict) -> None:
    """Give every trainable parameter of a model loaded in bf16 its exact fp32 value: the carried
    trained tensor, else the checkpoint's own (read by name, nothing else loaded), so a bf16 run
    starts from the same weights as an fp32 one."""
    from safetensors import safe_open

    from llamapro.checkpoint import weight_files

    want = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n in list(want):
            if n in trained:
                want.pop(n).data = trained[n].to(torch.float32).clone()
        for f in weight_files(Path(model_dir)) if want else []:
            with safe_open(str(f), framework="pt") as sf:
                for k in set(sf.keys()) & set(want):
                    want.pop(k).data = sf.get_tensor(k).to(torch.float32)
        for p in want.values():  # not stored by name (e.g. a tied head): the loaded value
            p.data = p.data.to(torch.float32)


def _hold_frozen_in(model, dtype: torch.dtype) -> int:
    """Cast every parameter that does not train to ``dtype`` in place; returns how many elements.

    Frozen weights never change, so they need no fp32 master: autocast computes in bf16 anyway and
    their memory halves. Trainable ones stay fp32 (master weights, fp32 gradients and Adam state).
    The run's output takes the originals from the base checkpoint, never from this copy."""
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.dtype != dtype and p.is_floating_point():
                p.data = p.data.to(dtype)
                n += p.numel()
    return n


# --- the worker -----------------------------------------------------------------------------------

def _lean_malloc() -> bool:
    """glibc: allocations >= 1 MiB come from mmap and go back to the OS when freed, instead of
    raising the heap's high-water mark step after step (torch's CPU allocator does not cache)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 20))
    except (OSError, AttributeError):
        return False


def _decoder_layers(model):
    """The decoder's layer list of a HF causal LM (through a peft wrapper too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder().layers


def _apply_checkpointing(model, how: str) -> list[int]:
    """Per-layer activation checkpointing; returns the checkpointed layer indices.

    Layers below the lowest layer with a trainable parameter get no graph at all (their inputs do
    not require grad), so checkpointing them would only cost time. "frozen": the frozen layers above
    it (backward needs their activations only to pass the gradient down); "all": every layer from
    the lowest trainable one up."""
    if how == "off":
        return []
    layers = _decoder_layers(model)
    trainable = [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]
    if not trainable:
        return []
    chosen = [i for i in range(min(trainable), len(layers)) if how == "all" or i not in trainable]
    if not chosen:
        return []
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    for i, layer in enumerate(layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = i in chosen
    return chosen


def _load_model(model_dir: str, dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                trust_remote_code=trust_remote_code)


def _overlay(model, trained: dict) -> None:
    if not trained:
        return
    sd = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in trained.items():
            sd[k].copy_(v.to(sd[k].dtype))


def _gather_trainable(engine, zero_stage: int) -> dict:
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in named}
    return {n: p.detach().cpu().clone() for n, p in named}


def _peak_rss() -> int:
    """Peak resident memory of this worker process so far, in bytes (Linux: ru_maxrss is KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    """Current resident memory of this process, in bytes."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _optimizer_state_numel(optimizer) -> int:
    """Elements of optimizer state (Adam moments) summed over all ranks: with only the new blocks
    handed to DeepSpeed this is 2 x their parameter count, whatever the ZeRO partitioning."""
    import torch.distributed as dist

    base = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the client optimizer
    n = 0
    for st in base.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.dim() > 0:
                n += v.numel()
    t = torch.tensor([n], dtype=torch.float64)
    dist.all_reduce(t)
    return int(t.item())


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


def train_loop(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from llamapro.expand.surgery import skip_layers

    tc = from_dict(TrainConfig, config["train"], "train")
    if tc.lean_malloc:
        _lean_malloc()
    rss_at_start = _rss()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, tc.cpus_per_worker))
    torch.manual_seed(config["seed"] + rank)
    use_cuda = tc.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", ctx.get_local_rank()) if use_cuda else torch.device("cpu")
    compute_dtype, dtype_info = resolve_dtype(tc.dtype, device)
    if tc.dtype == "auto" and world > 1:
        # every worker probes its own device (a timed probe on a loaded machine can differ):
        # bf16 only if all agree, or the ranks' collectives would disagree on sizes and hang/abort
        import torch.distributed as dist

        votes = torch.tensor([1 if compute_dtype == torch.bfloat16 else 0], dtype=torch.int32)
        dist.all_reduce(votes, op=dist.ReduceOp.MIN)
        if compute_dtype == torch.bfloat16 and not votes.item():
            compute_dtype = torch.float32
            dtype_info.update(compute="float32", reason=dtype_info["reason"] + "; another worker's "
                              "probe found no native bf16, so every worker computes in fp32")
    bf16 = compute_dtype == torch.bfloat16
    # bf16: autocast over fp32 trainable blocks and bf16 frozen weights (measured faster than
    # DeepSpeed's bf16 mode, which also keeps the activations' elementwise work in bf16 and a
    # flat fp32 copy). ZeRO-3 partitions every parameter, frozen ones too: there DeepSpeed's own
    # bf16 mode does the casting.
    ds_bf16 = bf16 and tc.zero_stage == 3
    dtype_info.update(frozen_weights="bfloat16" if bf16 else "float32", trainable_weights=(
        "bfloat16 (fp32 master in the optimizer)" if ds_bf16 else "float32"),
        method="deepspeed bf16" if ds_bf16 else "torch.autocast" if bf16 else "none")
    if rank == 0:
        print(f"[llamapro] compute dtype {dtype_info['compute']} ({dtype_info['reason']})", flush=True)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not ds_bf16)
    out_uri = config.get("out_uri")
    if config.get("model_uri"):  # no shared file system: each node keeps its own copy
        config["model_dir"] = storage.localize(config["model_uri"])
    if out_uri:  # this node's working copy of the run; rank 0 uploads what it writes there
        config["out_dir"] = str(storage.local_dir(out_uri))
    model_dir, out_dir = config["model_dir"], Path(config["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    new_layers = config["new_layers"]
    seq_len = config["seq_len"]

    stages = allocate(build_stages(new_layers or [0], tc.num_stages, tc.stage_ratios, tc.top_lr_scale,
                                   tc.cumulative, tc.final_originals_ratio)
                      if tc.mode == "llamapro" else build_stages([0]), tc.total_steps(seq_len))
    state = {"stage": 0, "step_in_stage": 0, "global_step": 0, "tokens": 0, "ds_valid": False,
             "best_eval": None, "bad_evals": 0, "early_stopped": [], "elapsed": 0.0}
    trained: dict = {}
    resume_dir = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        resume_dir = Path(tempfile.mkdtemp(prefix="llamapro-resume-"))
        ckpt.to_directory(str(resume_dir))
        state = json.loads((resume_dir / STATE_FILE).read_text())
        if (resume_dir / TRAINED_FILE).is_file():
            trained = load_file(resume_dir / TRAINED_FILE)
        if rank == 0:
            if out_uri:  # this node may not be the one that wrote the metrics so far
                storage.download(storage.join(out_uri, "metrics.jsonl"), out_dir / "metrics.jsonl")
            append_record(out_dir / "metrics.jsonl", {"event": "resume", "step": state["global_step"],
                                                      "stage": state["stage"]})
            print(f"[llamapro] resuming at stage {state['stage']} step {state['step_in_stage']} "
                  f"(global step {state['global_step']})", flush=True)

    # lets an operator (or a test) find and kill a worker process
    (out_dir / f"worker-{rank}.pid").write_text(str(os.getpid()))
    eval_sets = {k: (np.asarray(v["input_ids"]), np.asarray(v["labels"])) for k, v in config["eval_sets"].items()}
    primary = config.get("early_stop_on") or (next(iter(eval_sets)) if eval_sets else None)
    batches = _Batches(ray.train.get_dataset_shard("train"), tc.micro_batch_size)
    metrics_path = out_dir / "metrics.jsonl"
    tokens_per_step = tc.micro_batch_size * tc.grad_accum * world * seq_len
    engine = None

    def log(rec):
        if rank == 0:
            append_record(metrics_path, rec)  # a full disk leaves no half line to merge

    def evaluate(engine) -> dict:
        engine.module.eval()
        out = {}
        with torch.no_grad():
            for name, (ids, labels) in eval_sets.items():
                # rows dealt round-robin: a set with fewer rows than workers is still scored whole
                # (contiguous shares of len // world rows gave every rank none, and a loss of 0.0)
                n_rows = tc.eval_batches * tc.micro_batch_size
                tot = torch.zeros(2, dtype=torch.float64)
                x = torch.as_tensor(ids[rank::world][:n_rows])
                y = torch.as_tensor(labels[rank::world][:n_rows])
                for i in range(0, len(x), tc.micro_batch_size):
                    with autocast():
                        s, n = causal_lm_ce_sum(engine.module, x[i:i + tc.micro_batch_size].to(device),
                                                y[i:i + tc.micro_batch_size].to(device), chunked)
                    tot += torch.tensor([s.item(), n], dtype=torch.float64)
                dist.all_reduce(tot)
                out[name] = (tot[0] / tot[1].clamp_min(1)).item()
        engine.module.train()
        return out

    def save(engine, metrics: dict, ds_valid: bool):
        if config.get("report_metrics") is not None:  # e.g. the Tune objective (llamapro.tune)
            metrics = {**metrics, **config["report_metrics"](metrics)}
        d = Path(tempfile.mkdtemp(prefix="llamapro-ckpt-"))
        try:  # a full disk mid-checkpoint must not leave the temporary behind
            if ds_valid:
                engine.save_checkpoint(str(d / "ds"), tag="state", exclude_frozen_parameters=True)
            if rank == 0:
                st = dict(state, ds_valid=ds_valid)
                (d / STATE_FILE).write_text(json.dumps(st))
                if trained:
                    save_file({k: v.contiguous() for k, v in trained.items()}, str(d / TRAINED_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))
        finally:
            shutil.rmtree(d, ignore_errors=True)
        if rank == 0 and out_uri and metrics_path.is_file():  # progress visible beside the checkpoints
            storage.upload(metrics_path, storage.join(out_uri, "metrics.jsonl"))

    # every optimizer step drew grad_accum micro-batches on each worker: on resume, go past them
    consumed = state["global_step"] * tc.grad_accum
    if resume_dir is not None and consumed and tc.resume_data_skip:
        t_skip = time.perf_counter()
        batches.skip(consumed)
        log({"event": "data_skip", "step": state["global_step"], "micro_batches_per_worker": consumed,
             "epoch": batches.epoch, "seconds": round(time.perf_counter() - t_skip, 3)})
        if rank == 0:
            print(f"[llamapro] skipped the {consumed} micro-batches per worker trained on before the "
                  f"checkpoint ({time.perf_counter() - t_skip:.1f}s)", flush=True)

    for k in range(state["stage"], len(stages)):
        stage = stages[k]
        lora = tc.mode == "lora" or tc.lora_new_blocks
        # bf16 without LoRA: load straight in bf16 (no fp32 copy of the frozen majority, ever),
        # then the trainable parameters get their exact fp32 values below
        direct = bf16 and not ds_bf16 and not lora
        model = _load_model(model_dir, torch.bfloat16 if direct else torch.float32,
                            config.get("trust_remote_code", False))
        if lora:
            from peft import LoraConfig, get_peft_model

            lkw = dict(r=tc.lora.r, lora_alpha=tc.lora.alpha, lora_dropout=tc.lora.dropout,
                       target_modules=tc.lora.target_modules, task_type="CAUSAL_LM")
            if tc.lora_new_blocks:
                lkw.update(layers_to_transform=list(stage.layers), layers_pattern="layers")
            model = get_peft_model(model, LoraConfig(**lkw))
            _overlay(model, {("base_model.model." + n if not n.startswith("base_model") else n): v
                             for n, v in trained.items()} if trained else {})
        else:
            _overlay(model, trained)
        groups = select_parameters(model, tc, new_layers, stage if tc.mode == "llamapro" else None)
        if direct:
            _fp32_trainable(model, model_dir, trained)
        elif bf16 and not ds_bf16:
            _hold_frozen_in(model, torch.bfloat16)
            gc.collect()
        checkpointing = tc.gradient_checkpointing
        if checkpointing == "auto":  # bf16 activations are half as big: keeping them pays
            checkpointing = "off" if bf16 else "frozen"
        checkpointed = _apply_checkpointing(model, checkpointing)
        chunked = (tc.chunked_loss and tc.zero_stage < 3 and tc.distill_weight == 0
                   and supports_chunked_loss(model))
        n_train = sum(p.numel() for g in groups for p in g["params"])
        n_all = sum(p.numel() for p in model.parameters())
        group_sizes = {g["name"]: sum(p.numel() for p in g["params"]) for g in groups}
        for g in groups:
            g["initial_lr"] = g["lr"]
        optimizer = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.95))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(stage.steps, tc.warmup_ratio, tc.min_lr_ratio))
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=build_ds_config(tc, ds_bf16), dist_init_required=False)
        if resume_dir is not None and state["ds_valid"] and state["stage"] == k:
            engine.load_checkpoint(str(resume_dir / "ds"), tag="state", load_module_strict=False)
        if rank == 0:
            print(f"[llamapro] stage {k + 1}/{len(stages)} {stage.name}: layers {stage.layers if tc.mode == 'llamapro' else tc.mode} "
                  f"trainable {n_train / 1e6:.2f}M of {n_all / 1e6:.2f}M params, {stage.steps} steps, "
                  f"ZeRO-{tc.zero_stage}", flush=True)
        log({"event": "stage_start", "stage": k, "name": stage.name, "layers": stage.layers,
             "steps": stage.steps, "trainable_params": n_train, "total_params": n_all,
             "optimizer_groups": group_sizes, "checkpointing": checkpointing,
             "checkpointed_layers": checkpointed,
             "chunked_loss": chunked, "zero_stage": engine.zero_optimization_stage(), "dtype": dtype_info,
             "rss_at_start_bytes": rss_at_start, "rss_bytes": _rss(),
             "peak_rss_bytes": _peak_rss()})
        engine.train()
        stopped, metrics = False, {"step": state["global_step"], "stage": k}
        while state["step_in_stage"] < stage.steps and not stopped:
            t0, c0 = time.perf_counter(), time.process_time()
            loss_acc, kl_acc, data_s = 0.0, 0.0, 0.0
            for _ in range(tc.grad_accum):
                td = time.perf_counter()
                x, y = batches.next()
                data_s += time.perf_counter() - td
                x, y = x.to(device), y.to(device)
                with autocast():
                    if chunked:
                        s, n = causal_lm_ce_sum(engine.module, x, y, chunked=True)
                    else:
                        out = engine(input_ids=x, use_cache=False)
                        s, n = masked_ce_sum(out.logits, y)
                loss = s / max(1, n)
                if tc.distill_weight > 0:
                    with torch.no_grad(), skip_layers(engine.module, new_layers), autocast():
                        teacher = engine.module(input_ids=x).logits
                    kl = kl_to_teacher(out.logits, teacher, y, tc.distill_temperature)
                    loss = loss + tc.distill_weight * kl
                    kl_acc += kl.item() / tc.grad_accum
                engine.backward(loss)
                engine.step()
                loss_acc += loss.item() / tc.grad_accum
            dt, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            if state["step_in_stage"] == 0:
                log({"event": "optimizer_state", "stage": k,
                     "numel": _optimizer_state_numel(optimizer), "trainable_params": n_train})
            state["step_in_stage"] += 1
            state["global_step"] += 1
            state["tokens"] += tokens_per_step
            state["elapsed"] += dt
            lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(getattr(optimizer, "param_groups", []))}
            rec = {"event": "step", "step": state["global_step"], "stage": k, "loss": loss_acc,
                   "tokens": state["tokens"], "tokens_per_s": tokens_per_step / dt, "step_s": dt, "lr": lrs,
                   "data_s": data_s, "cpu_s": cpu_s,
                   "peak_rss_bytes": _peak_rss(), "rss_bytes": _rss()}
            if tc.distill_weight > 0:
                rec["kl"] = kl_acc
            log(rec)
            if rank == 0:
                print(f"[llamapro] step {state['global_step']:>4} stage {k} loss {loss_acc:.4f} "
                      f"{tokens_per_step / dt:,.0f} tok/s", flush=True)
            end_of_stage = state["step_in_stage"] >= stage.steps
            metrics = {"step": state["global_step"], "stage": k, "loss": loss_acc, "tokens": state["tokens"]}
            if eval_sets and (state["global_step"] % tc.eval_every == 0 or end_of_stage):
                ev = evaluate(engine)
                metrics.update({f"eval_loss/{n}": v for n, v in ev.items()})
                log({"event": "eval", "step": state["global_step"], "stage": k, "eval_loss": ev})
                if rank == 0:
                    print(f"[llamapro] eval step {state['global_step']}: " +
                          ", ".join(f"{n} {v:.4f}" for n, v in ev.items()), flush=True)
                cur = ev.get(primary)
                if cur is not None:
                    if state["best_eval"] is None or cur < state["best_eval"] - 1e-4:
                        state["best_eval"], state["bad_evals"] = cur, 0
                    else:
                        state["bad_evals"] += 1
                        if tc.patience and state["bad_evals"] >= tc.patience and not end_of_stage:
                            stopped = True
                            state["early_stopped"].append(k)
                            log({"event": "early_stop", "step": state["global_step"], "stage": k})
                            if rank == 0:
                                print(f"[llamapro] early stop of stage {k}: {primary} held-out loss "
                                      f"did not improve for {tc.patience} evaluations", flush=True)
            if state["global_step"] % tc.checkpoint_every == 0 and not (end_of_stage or stopped):
                save(engine, metrics, ds_valid=True)
        # stage end: carry the trained weights to the next stage
        current = _gather_trainable(engine, tc.zero_stage)
        if not (tc.mode == "lora" or tc.lora_new_blocks):
            trained.update({n.replace("base_model.model.", ""): v for n, v in current.items()})
        else:
            trained.update(current)
        state.update(stage=k + 1, step_in_stage=0, bad_evals=0, best_eval=state["best_eval"])
        final = k == len(stages) - 1
        save(engine, dict(metrics, stage_done=k, final=final), ds_valid=False)
        # free this stage's model before the next one (or the final checkpoint) loads another
        del engine, optimizer, model, scheduler, groups, current
        engine = None
        gc.collect()
        if final and rank == 0:
            _write_final(config, tc, trained, state, stages, dtype_info)
    if resume_dir is not None:
        shutil.rmtree(resume_dir, ignore_errors=True)


def _write_final(config: dict, tc: TrainConfig, trained: dict, state: dict, stages,
                 dtype_info: dict | None = None) -> None:
    """Rank 0: a standard HF checkpoint of the trained model, metadata carried over.

    The model is loaded afresh from the expanded checkpoint in fp32 and only the trained tensors
    (fp32 masters) are laid over it: the originals come from the checkpoint bit for bit, never from
    the bf16 copy that training computed with."""
    out = Path(config["out_dir"]) / "model"
    model = _load_model(config["model_dir"], torch.float32, config.get("trust_remote_code", False))
    if tc.mode == "lora" or tc.lora_new_blocks:
        from peft import LoraConfig, get_peft_model

        lkw = dict(r=tc.lora.r, lora_alpha=tc.lora.alpha, lora_dropout=tc.lora.dropout,
                   target_modules=tc.lora.target_modules, task_type="CAUSAL_LM")
        if tc.lora_new_blocks:
            lkw.update(layers_to_transform=sorted(config["new_layers"]), layers_pattern="layers")
        model = get_peft_model(model, LoraConfig(**lkw))
        _overlay(model, trained)
        model = model.merge_and_unload()
    else:
        _overlay(model, trained)
    meta = read_metadata(Path(config["model_dir"])) or {
        "version": METADATA_VERSION, "kind": "base", "new_layer_indices": [], "num_layers":
        model.config.num_hidden_layers}
    meta = dict(meta)
    meta["kind"] = "trained"
    meta["training"] = {
        "mode": tc.mode, "config": asdict(tc), "stages": [s.to_dict() for s in stages],
        "steps": state["global_step"], "tokens": state["tokens"], "train_seconds": state["elapsed"],
        "early_stopped_stages": state["early_stopped"], "best_eval_loss": state["best_eval"],
        "originals_frozen": tc.mode == "llamapro" and tc.original_lr == 0 and not tc.train_norms
        and not tc.train_embeddings and not tc.train_lm_head,
        "trained_from": config.get("model_uri") or config["model_dir"],
        "dtype": dtype_info or {},
    }
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(tmp)
        copy_side_files(Path(config["model_dir"]), tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    if config.get("out_uri"):  # the driver (maybe on another node) fetches it from there
        storage.upload(out, storage.join(config["out_uri"], "model"))
        storage.upload(Path(config["out_dir"]) / "metrics.jsonl", storage.join(config["out_uri"], "metrics.jsonl"))


# --- the driver -----------------------------------------------------------------------------------

def _training_failure(e, tc: TrainConfig, storage_dir: str, name: str) -> str:
    """One readable paragraph for a failed fit: each worker's own last error line."""
    failures = getattr(e, "worker_failures", None) or {}
    lines = []
    for rank, err in sorted(failures.items()):
        last = [l for l in str(err).strip().splitlines() if l.strip()]
        lines.append(f"  worker {rank}: {type(err).__name__}: {last[-1] if last else ''}")
    if not lines:
        last = [l for l in str(e).strip().splitlines() if l.strip()]
        lines.append(f"  {last[-1] if last else type(e).__name__}")
    return (f"training failed (after up to {tc.max_failures} restart(s) of the worker group):\n"
            + "\n".join(lines) + f"\nRay Train's logs and checkpoints: {storage_dir}/{name}; once the "
            "cause is fixed, the same command resumes from the latest checkpoint")


def run_training(tc: TrainConfig, model_dir: str, out_dir: str, train_ds, eval_sets: dict | None = None,
                 seq_len: int = 256, name: str = "train", seed: int = 0, early_stop_on: str | None = None,
                 trust_remote_code: bool = False, storage_path: str | None = None,
                 callbacks: list | None = None, report_metrics=None, model_uri: str | None = None,
                 out_uri: str | None = None):
    """Train and return the Ray Train ``Result``; the trained HF checkpoint lands in
    ``out_dir/model`` and per-step metrics in ``out_dir/metrics.jsonl``.

    ``eval_sets`` maps a held-out set's name to ``{"input_ids": [[...]], "labels": [[...]]}``
    (small and fixed, so every evaluation sees the same tokens). Rerunning with the same ``name``
    and ``storage_path`` resumes from the latest checkpoint.

    Without a file system shared by every node, give URIs (``s3://``, ``gs://``, ``file://``):
    ``model_uri`` is the same checkpoint as ``model_dir`` (the driver's local copy), and each
    worker downloads it to its own node; rank 0 works in its node's copy of ``out_uri`` and
    uploads the metrics (at every checkpoint) and the final model there, and the driver then
    fetches both into ``out_dir``.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    meta = read_metadata(Path(model_dir))
    new_layers = sorted(meta["new_layer_indices"]) if meta else []
    if tc.mode == "llamapro":  # library callers too: never train an expansion whose proof did not pass
        from llamapro.expand.api import require_proven

        require_proven(meta, tc.allow_unproven, str(model_dir))
    if tc.mode == "llamapro" and not new_layers:
        raise ValueError(
            f"{model_dir} records no inserted layers (no {METADATA_FILE} from `llamapro expand`); "
            "train mode llamapro needs an expanded checkpoint, or use mode full/lora/freeze_last_n")
    empty = [k for k, v in (eval_sets or {}).items() if not len(v["input_ids"])]
    if empty:
        raise ValueError(f"held-out set(s) {empty} have no rows: a loss over nothing would read as 0.0 "
                         "and drive early stopping; give them data or leave them out")
    config = {"train": asdict(tc), "model_dir": str(Path(model_dir).resolve()), "out_dir": str(out),
              "new_layers": new_layers, "seq_len": seq_len, "seed": seed,
              "eval_sets": eval_sets or {}, "early_stop_on": early_stop_on,
              "trust_remote_code": trust_remote_code, "model_uri": model_uri, "out_uri": out_uri,
              "report_metrics": report_metrics}
    storage_dir = storage_path or str(out / "ray")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_dir,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            callbacks=callbacks),  # e.g. Tune's TuneReportCallback (llamapro.tune)
        datasets={"train": train_ds},
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:  # Train V2 raises instead of returning result.error
        raise TrainingError(_training_failure(e, tc, storage_dir, name)) from e
    if out_uri and result.error is None:  # rank 0 may have run on another node
        for rel in ("model", "metrics.jsonl"):
            storage.download(storage.join(out_uri, rel), out / rel)
    return result
