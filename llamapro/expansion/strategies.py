"""Where new blocks go.

Every strategy answers one question: given a stack of ``L`` original layers and ``N`` new blocks,
which indices of the *expanded* stack (length ``L + N``) hold new blocks? Expressing a placement
as final indices makes it unambiguous (no "after layer i" off-by-ones), makes duplicates
impossible, and lets every later step (training, stripping, fusion) read the answer straight from
the checkpoint's metadata instead of re-deriving it from a stride.

Each new block is initialised from a *source* original layer: the nearest original layer below it,
or layer 0 when there is none below (a block inserted at the very bottom).

Pure Python: no torch, no ray.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamapro.config import STRATEGIES  # the names live with the config that validates them
from llamapro.errors import PlacementError  # noqa: F401


def even_positions(num_layers: int, num_new: int) -> list[int]:
    """LLaMA-Pro interleaving: split the originals into ``num_new`` groups as evenly as possible
    and put one new block after each group.

    When ``num_new`` divides ``num_layers`` this is exactly LLaMA-Pro (32 layers, 8 new: a new
    block after every 4 originals, the last one on top). Otherwise the groups differ in size by at
    most one, larger groups first. When ``num_new > num_layers`` some groups are empty and new
    blocks sit next to each other; every requested block is still inserted.
    """
    _check_counts(num_layers, num_new)
    base, extra = divmod(num_layers, num_new)
    positions, originals_so_far = [], 0
    for g in range(num_new):
        originals_so_far += base + (1 if g < extra else 0)
        positions.append(originals_so_far + g)  # g new blocks already placed below this one
    return positions


def top_positions(num_layers: int, num_new: int) -> list[int]:
    _check_counts(num_layers, num_new)
    return list(range(num_layers, num_layers + num_new))


def bottom_positions(num_layers: int, num_new: int) -> list[int]:
    _check_counts(num_layers, num_new)
    return list(range(num_new))


def middle_positions(num_layers: int, num_new: int) -> list[int]:
    """A contiguous run of new blocks after the lower half of the originals."""
    _check_counts(num_layers, num_new)
    start = num_layers // 2
    return list(range(start, start + num_new))


_BUILDERS = {
    "even": even_positions,
    "top": top_positions,
    "bottom": bottom_positions,
    "middle": middle_positions,
}
assert tuple(_BUILDERS) == STRATEGIES, "llamapro.config.STRATEGIES and the builders here must agree"


def _check_counts(num_layers: int, num_new: int) -> None:
    if not isinstance(num_layers, int) or num_layers < 1:
        raise PlacementError(f"the base model must have at least one layer, got {num_layers!r}")
    if not isinstance(num_new, int) or isinstance(num_new, bool) or num_new < 1:
        raise PlacementError(
            f"number of new blocks must be an integer >= 1, got {num_new!r} (set --blocks N)"
        )


def validate_positions(num_layers: int, positions, num_new: int | None = None) -> list[int]:
    """Check an explicit list of new-block indices in the expanded stack; return it sorted."""
    try:
        pos = [int(p) for p in positions]
    except (TypeError, ValueError) as e:
        raise PlacementError(
            f"positions must be integers (indices of the new blocks in the expanded model), "
            f"got {positions!r}"
        ) from e
    if any(str(p).strip() != str(int(p)) for p in positions if isinstance(p, str)):
        raise PlacementError(f"positions must be plain integers, got {positions!r}")
    if not pos:
        raise PlacementError("positions is empty: give at least one index, e.g. --positions 4,9")
    if num_new is not None and num_new != len(pos):
        raise PlacementError(
            f"--blocks {num_new} disagrees with {len(pos)} explicit positions {pos}; "
            "give one or make them agree"
        )
    dup = sorted({p for p in pos if pos.count(p) > 1})
    if dup:
        raise PlacementError(
            f"duplicate positions {dup}: each index of the expanded model can hold one new block"
        )
    total = num_layers + len(pos)
    bad = [p for p in pos if p < 0 or p >= total]
    if bad:
        raise PlacementError(
            f"positions {bad} are out of range: with {num_layers} original layers and "
            f"{len(pos)} new blocks the expanded model has layers 0..{total - 1}"
        )
    return sorted(pos)


@dataclass(frozen=True)
class Placement:
    """The answer to "where do the new blocks go", with the maps everything else needs."""

    num_original: int
    new_indices: tuple[int, ...]
    strategy: str

    @property
    def num_new(self) -> int:
        return len(self.new_indices)

    @property
    def num_total(self) -> int:
        return self.num_original + self.num_new

    def layout(self) -> list[tuple[str, int]]:
        """For each expanded index: ("orig", original index) or ("new", source original index)."""
        new = set(self.new_indices)
        out, next_orig = [], 0
        for i in range(self.num_total):
            if i in new:
                src = next_orig - 1 if next_orig > 0 else 0
                out.append(("new", src))
            else:
                out.append(("orig", next_orig))
                next_orig += 1
        return out

    def orig_to_expanded(self) -> dict[int, int]:
        return {src: i for i, (kind, src) in enumerate(self.layout()) if kind == "orig"}

    def new_sources(self) -> dict[int, int]:
        """expanded index of each new block -> the original layer it was copied from."""
        return {i: src for i, (kind, src) in enumerate(self.layout()) if kind == "new"}

    def source_of(self) -> list[int]:
        """For every expanded index, the original layer whose tensors it starts from."""
        return [src for _, src in self.layout()]

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "num_original_layers": self.num_original,
            "num_new_layers": self.num_new,
            "num_layers": self.num_total,
            "new_layer_indices": list(self.new_indices),
            "new_layer_sources": {str(k): v for k, v in self.new_sources().items()},
        }


def plan(num_layers: int, num_new: int | None = None, strategy: str | None = "even",
         positions=None) -> Placement:
    """Resolve a strategy name or an explicit position list into a :class:`Placement`."""
    if positions is not None and len(positions) > 0:
        pos = validate_positions(num_layers, positions, num_new)
        return Placement(num_layers, tuple(pos), "explicit")
    if strategy not in _BUILDERS:
        raise PlacementError(
            f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)} "
            "or give explicit --positions"
        )
    if num_new is None:
        raise PlacementError("give the number of new blocks (--blocks N) with a strategy")
    return Placement(num_layers, tuple(_BUILDERS[strategy](num_layers, num_new)), strategy)
