import pytest

from llamapro.expansion.strategies import PlacementError, STRATEGIES, even_positions, plan, validate_positions


def test_even_matches_llama_pro_interleaving():
    # LLaMA-Pro-8B: 32 layers, 8 new, one after every 4 originals, the last on top.
    assert even_positions(32, 8) == [4, 9, 14, 19, 24, 29, 34, 39]
    p = plan(32, 8, "even")
    layout = p.layout()
    assert [k for k, _ in layout[:5]] == ["orig"] * 4 + ["new"]
    assert p.new_sources()[4] == 3  # copies the block before it


def test_even_spreads_when_not_divisible():
    pos = even_positions(30, 7)
    p = plan(30, 7, "even")
    groups, run = [], 0
    for kind, _ in p.layout():
        if kind == "orig":
            run += 1
        else:
            groups.append(run)
            run = 0
    assert len(pos) == 7 and max(groups) - min(groups) <= 1 and sum(groups) == 30


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layers,new", [(1, 1), (4, 3), (5, 2), (2, 5), (30, 6), (7, 7)])
def test_every_strategy_inserts_exactly_n(strategy, layers, new):
    p = plan(layers, new, strategy)
    assert p.num_new == new and p.num_total == layers + new
    assert len(set(p.new_indices)) == new
    assert all(0 <= i < layers + new for i in p.new_indices)
    kinds = [k for k, _ in p.layout()]
    assert kinds.count("orig") == layers
    # originals keep their order
    assert [s for k, s in p.layout() if k == "orig"] == list(range(layers))


def test_top_bottom_middle():
    assert plan(6, 2, "top").new_indices == (6, 7)
    assert plan(6, 2, "bottom").new_indices == (0, 1)
    assert plan(6, 2, "middle").new_indices == (3, 4)
    assert plan(6, 2, "bottom").new_sources() == {0: 0, 1: 0}  # nothing below: copy layer 0


def test_explicit_positions_sorted_and_validated():
    assert plan(4, None, positions=[5, 0]).new_indices == (0, 5)
    with pytest.raises(PlacementError, match="duplicate"):
        validate_positions(4, [1, 1])
    with pytest.raises(PlacementError, match="out of range.*0..5"):
        validate_positions(4, [1, 6])
    with pytest.raises(PlacementError, match="out of range"):
        validate_positions(4, [-1])
    with pytest.raises(PlacementError, match="integers"):
        validate_positions(4, ["a"])
    with pytest.raises(PlacementError, match="disagrees"):
        validate_positions(4, [1, 2], num_new=3)
    with pytest.raises(PlacementError, match="empty"):
        validate_positions(4, [])


def test_bad_counts_and_strategy():
    with pytest.raises(PlacementError, match=">= 1"):
        plan(4, 0, "even")
    with pytest.raises(PlacementError, match="unknown strategy"):
        plan(4, 1, "sideways")
