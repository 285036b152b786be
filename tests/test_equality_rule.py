"""The equality rule itself must be able to fail."""

from tests.support.equality import bf16_ulp, compare_greedy


def _top2(pairs):
    return [[(a, la), (b, lb)] for a, la, b, lb in pairs]


def test_identical():
    v = compare_greedy([1, 2, 3], _top2([(1, 5, 9, 1), (2, 5, 9, 1), (3, 5, 9, 1)]), [1, 2, 3])
    assert v.identical and v.ok


def test_tie_divergence_is_allowed_only_to_the_runner_up():
    ref = [1, 2, 3]
    top2 = _top2([(1, 5.0, 9, 1.0), (2, 5.0, 7, 5.0 - bf16_ulp(5.0)), (3, 5, 9, 1)])
    assert compare_greedy(ref, top2, [1, 7, 4]).ok          # runner-up, margin one ulp
    assert not compare_greedy(ref, top2, [1, 8, 4]).ok      # not among the reference's candidates


def test_three_way_tie_with_three_candidates():
    ref = [1, 2]
    top3 = [[(1, 5.0), (9, 1.0), (8, 0.5)],
            [(2, 5.0), (7, 5.0 - bf16_ulp(5.0)), (6, 5.0 - bf16_ulp(5.0))]]
    assert compare_greedy(ref, top3, [1, 6]).ok
    top3[1][2] = (6, 4.5)                                   # third candidate clearly below
    assert not compare_greedy(ref, top3, [1, 6]).ok


def test_clear_margin_divergence_fails():
    ref = [1, 2]
    top2 = _top2([(1, 5.0, 9, 1.0), (2, 5.0, 7, 4.5)])
    v = compare_greedy(ref, top2, [1, 7])
    assert not v.ok and v.first_divergence == 1 and "margin above" in v.detail


def test_length_mismatch_fails():
    assert not compare_greedy([1, 2], _top2([(1, 5, 9, 1), (2, 5, 9, 1)]), [1]).ok
