"""The ``train`` section of the config tree. Pure: no torch, no ray."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from llamapro.errors import ConfigError

MODES = ("llamapro", "full", "lora", "freeze_last_n")
MODULE_SETS = ("all", "attn", "mlp")
CHECKPOINTING = ("auto", "frozen", "all", "off")
QUANTIZE_BASES = ("none", "nf4", "int8")


@dataclass
class LoraConfig:
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (effective scale alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA path during training."""
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Module names LoRA adapts (peft target_modules)."""


@dataclass
class TrainConfig:
    mode: str = "llamapro"
    """llamapro: train only the inserted blocks of the expanded model (originals frozen).
    Baselines on the *unexpanded* base at the same token budget: full (every parameter),
    lora (peft LoRA on the original model), freeze_last_n (the last `freeze_last_n` original
    layers trainable, no expansion; LLaMA-Factory's freeze tuning)."""
    trainable_modules: list[str] = field(default_factory=lambda: ["all"])
    """Which parts of the new blocks train: all, attn, mlp, or module names such as
    self_attn.q_proj (LLaMA-Factory's freeze_trainable_modules)."""
    freeze_last_n: int = 2
    """For mode freeze_last_n: how many of the last original layers train."""
    lora_new_blocks: bool = False
    """mode llamapro only: train LoRA adapters on the new blocks instead of their full weights
    (peft; merged when the run ends)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantize_base: str = "none"
    """mode llamapro only: hold the frozen original layers quantized while the new blocks train
    (QLoRA-style, bitsandbytes on an x86-64 CPU or a CUDA GPU; `pip install 'llamapro[quant]'`):
    none (full precision), nf4 (4-bit NormalFloat) or int8 (LLM.int8). Only the originals' Linear
    layers are quantized; the new blocks train in full precision (or with LoRA: lora_new_blocks),
    embeddings, norms and head stay as loaded and frozen. The written model is full precision with
    the originals bit-identical to the expanded checkpoint. The originals cannot train on it:
    needs original_lr 0, final_originals_ratio 0, train_norms/train_embeddings/train_lm_head off
    and zero_stage <= 2 (ZeRO-3 would partition the quantized weights). Linear input sizes must be
    multiples of 64 (bitsandbytes' 4-bit blocks; true of real models)."""
    train_norms: bool = False
    """Also train the final norm (and every original layer norm)."""
    train_embeddings: bool = False
    """Also train the input embeddings (and a tied lm_head with them)."""
    train_lm_head: bool = False
    """Also train an untied lm_head."""
    original_lr: float = 0.0
    """LR for the original layers in mode llamapro: 0 keeps them frozen (bit-identical);
    <= 1e-6 is a "micro-adjustment" of the originals after the new blocks have learned."""

    lr: float = 1e-3
    """Peak LR of the new blocks. Chosen by the study (``benchmarks/study.py``, README "The study"):
    SmolLM2-135M grown by 6 blocks, all trained together (one stage, the default), 49k tokens:
    1e-3 gained 0.181 nats on the new domain against 0.177 at 3e-3, 0.145 at 3e-4 and 0.083 at
    1e-4 (2026-12-03). New blocks start as identities and need a higher LR than a fine-tuned model;
    a staged layout (num_stages > 1) did best at 3e-4. LLaMA-Pro's own 8B run used 2e-4. For runs
    of billions of tokens on large models, sweep it (``llamapro tune``) rather than trust it."""
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    warmup_ratio: float = 0.05
    """Share of each stage's steps spent warming up linearly."""
    weight_decay: float = 0.0
    """AdamW weight decay of every trained parameter."""
    max_grad_norm: float = 1.0
    """Gradient clipping (1.0 is the usual choice). 0 disables."""
    micro_batch_size: int = 4
    """Packed blocks per worker per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    max_tokens: int = 0
    """Token budget of the whole run (all stages, all workers). 0: use max_steps."""
    max_steps: int = 20
    """Optimizer steps of the whole run when max_tokens is 0."""
    gradient_checkpointing: str = "auto"
    """Recompute activations in backward instead of keeping them. "auto": "off" when the run
    computes in bf16 (activations are half the size; measured on SmolLM2 30 -> 36, batch 4 x 256:
    ~35% less CPU per step than "frozen" at a 2.07 GB worker peak), "frozen" in fp32. "frozen" checkpoints the frozen
    layers that lie above the lowest trainable one (they need their activations only to pass the
    gradient down, never for a weight gradient), "all" every layer from the lowest trainable one up,
    "off" none. Layers below the lowest trainable one never build a graph at all. (true/false are
    read as all/off.)"""
    chunked_loss: bool = True
    """Compute the loss chunk by chunk with its gradient made in the same pass, never holding the
    full-vocabulary logits of the batch (exact; off for logit soft-capping, ZeRO-3, distillation)."""
    lean_malloc: bool = True
    """Linux/glibc: serve large allocations from mmap so freed activations go back to the OS
    instead of staying in the process's heap (peak RSS), at a small page-fault cost."""
    compile: str = "auto"
    """Regional torch.compile of the decoder layers (llamapro/training/compile.py). auto: on where
    measured to pay (bf16 autocast, a model of >= 50M parameters, >= 16 optimizer steps; not with
    ZeRO-3, LoRA, a quantized base, distillation or activation checkpointing); on / off force it
    (on still runs eagerly where it cannot apply, and says why). The first step pays the
    compilation: ~45 s with a cold inductor cache, a few seconds once it is warm."""
    dtype: str = "auto"
    """Compute dtype. auto: bf16 where the device computes it natively (a CUDA GPU with bf16; a CPU
    whose oneDNN has bf16 kernels and where a short timed matmul probe at start shows bf16 at least
    1.5x faster than fp32, e.g. AVX512-BF16 or AMX), fp32 otherwise; the choice and the probe's
    result go to the run's log and metadata. With bf16 the frozen weights are held in bf16 (no
    master copy) and the trainable ones in fp32 (fp32 gradients and optimizer state), under
    autocast. float32 / bfloat16 force it (bf16 on a CPU without it is ~100x slower)."""

    num_stages: int = 1
    """Groups of new blocks unfrozen bottom to top; 1 = plain LLaMA-Pro."""
    stage_ratios: list[float] = field(default_factory=list)
    """Share of the step budget per stage: [] equal, [0.3] first stage 30% and the rest split
    evenly, or one value per stage summing to 1."""
    cumulative: bool = True
    """Later stages keep training the groups unfrozen before them."""
    top_lr_scale: float = 1.0
    """LR multiplier of the top group relative to the bottom one (linear in between), e.g. 2.0."""
    final_originals_ratio: float = 0.0
    """> 0 adds a last stage (this share of the budget) that also trains the original layers at
    original_lr (which must then be > 0)."""

    eval_every: int = 10
    """Held-out evaluation every N optimizer steps (and at each stage's end)."""
    eval_batches: int = 4
    """Micro-batches per worker per held-out evaluation."""
    early_stop_on: str = ""
    """Held-out set (a data source's name) whose loss drives early stopping; default: the first
    data source (the new domain)."""
    patience: int = 0
    """Early stopping: end a stage after this many evaluations without improvement of the
    new-domain held-out loss (e.g. 2). 0 disables."""

    distill_weight: float = 0.0
    """Weight of a KL term to the base model's distribution, computed by the same model with
    the new blocks skipped (exactly the base; no second model in memory). 0 disables."""
    distill_temperature: float = 1.0
    """Softmax temperature of both distributions in the KL term (scaled back by its square)."""

    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0, 1, 2 or 3."""
    deepspeed_config: str = ""
    """Path to your own DeepSpeed JSON; its keys override the generated config."""
    num_workers: int = 2
    """Ray Train workers."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves per worker; also its torch thread count."""
    use_gpu: bool = False
    """One GPU per worker (NCCL, bf16)."""
    checkpoint_every: int = 10
    """Save a resumable checkpoint every N optimizer steps (and at each stage's end)."""
    keep_checkpoints: int = 2
    """Ray Train checkpoints kept (the newest)."""
    max_failures: int = 1
    """Worker-group restarts Ray Train attempts from the latest checkpoint."""
    resume_data_skip: bool = True
    """On resume, each worker first draws and drops the micro-batches it had trained on before the
    checkpoint (as HF Trainer does unless ignore_data_skip), so the run goes on through the data
    instead of repeating its start. Exactly the same blocks come back with one worker and
    data.preserve_order; otherwise the same number is dropped from a stream whose order (or
    assignment to workers) may differ. False: start the stream again (a faster resume on a huge
    corpus)."""
    allow_unproven: bool = False
    """Train an expansion whose identity proof failed, was skipped (too large, --no-verify) or
    never finished. Off: such a model is refused until `llamapro verify` proves it."""

    def __post_init__(self):
        def bad(key, msg):
            raise ConfigError(f"train.{key}: {msg}")

        gc = str(self.gradient_checkpointing).lower()
        self.gradient_checkpointing = {"true": "all", "false": "off", "none": "off"}.get(gc, gc)
        if self.gradient_checkpointing not in CHECKPOINTING:
            bad("gradient_checkpointing", f"{self.gradient_checkpointing!r} is not one of "
                f"{', '.join(CHECKPOINTING)} (or true/false)")
        if self.mode not in MODES:
            bad("mode", f"{self.mode!r} is not one of {', '.join(MODES)}")
        for m in self.trainable_modules:
            if m not in MODULE_SETS and not m.replace("_", "").replace(".", "").isalnum():
                bad("trainable_modules", f"{m!r} is neither all/attn/mlp nor a module name")
        if self.zero_stage not in (0, 1, 2, 3):
            bad("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.lr <= 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.original_lr <= 1e-4:
            bad("original_lr", f"must be in [0, 1e-4] (a micro-adjustment is <= 1e-6), got {self.original_lr}")
        if self.final_originals_ratio > 0 and self.original_lr <= 0:
            bad("final_originals_ratio", "needs train.original_lr > 0 (the LR the originals train at)")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        for key in ("micro_batch_size", "grad_accum", "num_workers", "cpus_per_worker",
                    "num_stages", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.max_tokens < 0 or (self.max_tokens == 0 and self.max_steps < 1):
            bad("max_tokens", "set max_tokens > 0 or max_steps >= 1")
        if self.max_grad_norm < 0:
            bad("max_grad_norm", "must be >= 0")
        if self.distill_weight < 0 or self.distill_temperature <= 0:
            bad("distill_weight", "must be >= 0 with distill_temperature > 0")
        comp = str(self.compile).lower()
        self.compile = {"true": "on", "false": "off"}.get(comp, comp)
        if self.compile not in ("auto", "on", "off"):
            bad("compile", f"use auto, on or off, got {self.compile!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            bad("dtype", f"use auto, float32 or bfloat16, got {self.dtype!r}")
        if self.mode != "llamapro" and (self.num_stages > 1 or self.lora_new_blocks or self.distill_weight):
            bad("mode", "staged training, lora_new_blocks and distillation apply to mode llamapro")
        if self.lora_new_blocks and self.zero_stage == 3:
            bad("lora_new_blocks", "LoRA with ZeRO-3 is not supported here; use zero_stage <= 2")
        if self.patience < 0:
            bad("patience", "must be >= 0")
        self._check_quantize_base(bad)

    def _check_quantize_base(self, bad) -> None:
        """A quantized base is frozen: refuse every setting that would train an original weight."""
        q = self.quantize_base
        if q not in QUANTIZE_BASES:
            bad("quantize_base", f"{q!r} is not one of {', '.join(QUANTIZE_BASES)}")
        if q == "none":
            return
        fix = "or set train.quantize_base: none"
        if self.mode != "llamapro":
            bad("quantize_base", f"{q} applies to mode llamapro (frozen originals, only the new "
                f"blocks train), not mode {self.mode}: use train.mode: llamapro, {fix}")
        if self.original_lr > 0 or self.final_originals_ratio > 0:
            bad("quantize_base", f"{q} keeps the original layers frozen and quantized, but "
                f"original_lr={self.original_lr} / final_originals_ratio={self.final_originals_ratio} "
                f"would train them: set train.original_lr: 0 and train.final_originals_ratio: 0, {fix}")
        extra = [k for k in ("train_norms", "train_embeddings", "train_lm_head") if getattr(self, k)]
        if extra:
            bad("quantize_base", f"{q} trains only the new blocks, but {', '.join(extra)} would "
                f"train frozen base weights: set {', '.join('train.' + k for k in extra)}: false, {fix}")
        if self.zero_stage > 2:
            bad("quantize_base", f"{q} cannot run under ZeRO-3 (it would partition the quantized "
                f"weights): set train.zero_stage: 2 or lower, {fix}")

    def total_steps(self, seq_len: int) -> int:
        """Optimizer steps of the whole run."""
        if self.max_tokens:
            per_step = self.micro_batch_size * self.grad_accum * self.num_workers * seq_len
            return max(1, self.max_tokens // per_step)
        return self.max_steps


def baseline_of(tc: TrainConfig, mode: str) -> TrainConfig:
    """The same training budget and optimizer settings in another mode (a baseline for the
    comparison): what only applies to mode llamapro (stages, LoRA on the new blocks,
    distillation, a quantized base) is dropped instead of refused."""
    if mode == "llamapro":
        return tc
    return dataclasses.replace(tc, mode=mode, num_stages=1, stage_ratios=[], top_lr_scale=1.0,
                               final_originals_ratio=0.0, lora_new_blocks=False, distill_weight=0.0,
                               quantize_base="none")

