"""The staged-unfreezing schedule, as plain data. No torch, no ray.

The inserted blocks are split, bottom to top, into ``num_stages`` contiguous groups. Stage ``k``
trains group ``k`` (or groups ``0..k`` when cumulative), each group at ``lr * scale`` where the
scale rises linearly from 1 at the bottom group to ``top_lr_scale`` at the top one (upper blocks
may learn faster: "top ~2x bottom"). Each stage gets its share of the token budget
(``stage_ratios``) and may stop early on held-out loss. An optional final stage also trains the
original layers at a tiny LR (a "micro-adjustment").

A single stage over all new blocks is the plain LLaMA-Pro recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llamapro.errors import ScheduleError


@dataclass
class Stage:
    index: int
    name: str
    layers: list[int]                # new-layer indices trainable in this stage
    lr_scale: dict[int, float]       # new-layer index -> LR multiplier
    ratio: float                     # share of the total step budget
    steps: int = 0                   # filled by allocate()
    train_originals: bool = False    # final micro-adjustment stage
    groups: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "layers": self.layers,
                "lr_scale": {str(k): v for k, v in self.lr_scale.items()}, "ratio": self.ratio,
                "steps": self.steps, "train_originals": self.train_originals, "groups": self.groups}


def split_groups(new_layers, num_groups: int) -> list[list[int]]:
    """Contiguous groups bottom to top, sizes differing by at most one (larger groups first)."""
    layers = sorted(new_layers)
    if num_groups < 1:
        raise ScheduleError(f"train.num_stages must be >= 1, got {num_groups}")
    if num_groups > len(layers):
        raise ScheduleError(
            f"train.num_stages={num_groups} but there are only {len(layers)} new blocks; "
            "each stage needs at least one block"
        )
    base, extra = divmod(len(layers), num_groups)
    out, i = [], 0
    for g in range(num_groups):
        n = base + (1 if g < extra else 0)
        out.append(layers[i:i + n])
        i += n
    return out


def normalise_ratios(ratios, n: int) -> list[float]:
    """``[]`` -> equal shares; a single value -> first stage's share, rest split evenly;
    n values -> used as given (must sum to 1 within 1e-6)."""
    r = [float(x) for x in (ratios or [])]
    if any(x <= 0 for x in r):
        raise ScheduleError(f"train.stage_ratios must be positive, got {r}")
    if not r:
        return [1.0 / n] * n
    if n == 1 and len(r) == 1:
        return [1.0]  # one stage is the whole budget, whatever share a staged config gave its first
    if len(r) == 1 and n > 1:
        if r[0] >= 1:
            raise ScheduleError(f"train.stage_ratios=[{r[0]}] leaves nothing for the other {n - 1} stages")
        return [r[0]] + [(1 - r[0]) / (n - 1)] * (n - 1)
    if len(r) != n:
        raise ScheduleError(f"train.stage_ratios has {len(r)} entries for {n} stages")
    if abs(sum(r) - 1) > 1e-6:
        raise ScheduleError(f"train.stage_ratios must sum to 1, got {sum(r):.4f} ({r})")
    return r


def build_stages(new_layers, num_stages: int = 1, stage_ratios=None, top_lr_scale: float = 1.0,
                 cumulative: bool = True, final_originals_ratio: float = 0.0) -> list[Stage]:
    groups = split_groups(new_layers, num_stages)
    n_total = num_stages + (1 if final_originals_ratio > 0 else 0)
    if final_originals_ratio > 0:
        if final_originals_ratio >= 1:
            raise ScheduleError("train.final_originals_ratio must be < 1")
        main = normalise_ratios(stage_ratios, num_stages)
        ratios = [x * (1 - final_originals_ratio) for x in main] + [final_originals_ratio]
    else:
        ratios = normalise_ratios(stage_ratios, n_total)
    scale = {}
    for g, layers in enumerate(groups):
        s = 1.0 if num_stages == 1 else 1.0 + (top_lr_scale - 1.0) * g / (num_stages - 1)
        for layer in layers:
            scale[layer] = s
    stages = []
    for k in range(num_stages):
        gs = list(range(k + 1)) if cumulative else [k]
        layers = sorted(l for g in gs for l in groups[g])
        stages.append(Stage(k, f"stage{k}" if num_stages > 1 else "llamapro", layers,
                            {l: scale[l] for l in layers}, ratios[k], groups=gs))
    if final_originals_ratio > 0:
        layers = sorted(new_layers)
        stages.append(Stage(num_stages, "originals", layers, {l: scale[l] for l in layers},
                            ratios[-1], train_originals=True, groups=list(range(num_stages))))
    return stages


def allocate(stages: list[Stage], total_steps: int) -> list[Stage]:
    """Give each stage its share of ``total_steps`` (largest-remainder rounding, >= 1 each)."""
    if total_steps < len(stages):
        raise ScheduleError(
            f"the budget allows only {total_steps} optimizer steps for {len(stages)} stages; "
            "raise train.max_tokens/max_steps or use fewer stages"
        )
    raw = [s.ratio * total_steps for s in stages]
    steps = [max(1, int(x)) for x in raw]
    rest = total_steps - sum(steps)
    order = sorted(range(len(stages)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
    i = 0
    while rest > 0:
        steps[order[i % len(order)]] += 1
        rest -= 1
        i += 1
    while rest < 0:  # the >= 1 floor overshot: take from the largest
        j = max(range(len(steps)), key=lambda i: steps[i])
        steps[j] -= 1
        rest += 1
    for s, n in zip(stages, steps):
        s.steps = n
    return stages
