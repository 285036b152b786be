"""The team's "token for token" rule for greedy outputs under bf16.

Two greedy runs are equal when their tokens agree up to the first divergence, and a divergence is
allowed only at a tie of the reference: the other run's token is the reference's runner-up and the
reference's top-2 logit margin there is within bf16 noise (with more than two recorded candidates,
the other token may be any candidate within that bound: a three-way tie). After a divergence the two runs continue
from different contexts, so nothing after it is compared. (../shared/reference/cpu-vllm.md shows why
random bf16 models tie and why scaling the LM head does not remove ties: bf16 precision is relative.)
"""

from __future__ import annotations

import dataclasses
import math

#: A margin counts as a tie when it is at most this many bf16 ulps of the larger logit. bf16 keeps 8
#: significant bits, so one ulp at x is 2**(floor(log2|x|) - 7). Divergences between spec and
#: non-spec paths were seen at margins up to about one ulp.
TIE_ULPS = 2.0


def bf16_ulp(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 2.0 ** -133
    return 2.0 ** (math.floor(math.log2(x)) - 7)


@dataclasses.dataclass
class Verdict:
    identical: bool
    ok: bool
    first_divergence: int | None
    detail: str


def compare_greedy(ref_tokens: list[int], ref_top2: list[list[tuple[int, float]]],
                   other_tokens: list[int], tie_ulps: float = TIE_ULPS) -> Verdict:
    """Compare ``other_tokens`` with a greedy reference.

    ``ref_top2[i]`` holds the reference's best (token, raw logit) pairs at position i (at least two;
    ask vLLM with ``logprobs=k`` and ``--logprobs-mode raw_logits``). At a divergence the other token
    must be one of them and within the tie bound of the best: with k > 2 a three-way tie passes too.
    """
    n = min(len(ref_tokens), len(other_tokens))
    for i in range(n):
        if ref_tokens[i] == other_tokens[i]:
            continue
        top = sorted(ref_top2[i], key=lambda t: -t[1])
        if len(top) < 2:
            return Verdict(False, False, i, f"position {i}: no runner-up recorded for the reference")
        (t1, l1), (t2, l2) = top[0], top[1]
        other = dict(top).get(other_tokens[i])
        lo = other if other is not None else l2
        margin = l1 - lo
        bound = tie_ulps * bf16_ulp(max(abs(l1), abs(lo)))
        detail = (f"position {i}: reference {ref_tokens[i]} (logit {l1:.4f}), other {other_tokens[i]}"
                  f" (logit {'?' if other is None else f'{other:.4f}'}), reference runner-up {t2} "
                  f"(logit {l2:.4f}), margin {margin:.4f}, tie bound {bound:.4f}")
        if t1 != ref_tokens[i]:
            return Verdict(False, False, i, "reference top-1 is not its own greedy token; " + detail)
        if other is None:
            return Verdict(False, False, i, "other token is not among the reference's top tokens; "
                           + detail)
        if margin > bound:
            return Verdict(False, False, i, "margin above bf16 noise; " + detail)
        return Verdict(False, True, i, "tie; " + detail)
    if len(ref_tokens) != len(other_tokens):
        return Verdict(False, False, n, f"lengths differ: {len(ref_tokens)} vs {len(other_tokens)}")
    return Verdict(True, True, None, "identical")
