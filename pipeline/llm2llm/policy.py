"""How `sift loop --loop.policy learned` sets each teacher's share of a round: Thompson sampling.

    ev = evidence(served, before, after, targeted, added, valid_loss_delta=-0.02)   # round r-1's teachers
    shares = thompson_shares(posterior([ev, ...], names), seed=0, round_index=3)

Each failure a teacher was sent is one trial. It is a success when the teacher added at least one
record for it and the student's score on that failure rose from the round that sent it to the next
(the student trained on the addition); it is a failure when the score did not rise, when the
teacher's additions were all rejected, or when it failed the request (another teacher served it).
The change in eval loss on the fixed validation split is one more, shared trial: a fall counts as
a success, a rise as a failure, split among the teachers by their share of the added records.
Each teacher's posterior is Beta(1 + successes, 1 + failures) over every round so far, and its
next share is the probability that its draw is the best (probability matching, estimated from
seeded draws so a resume computes the same shares). Why Thompson sampling rather than Exp3: the
rewards are counts of trials, which a Beta posterior models exactly; with two or three rounds the
posterior's width, not a tuned learning rate, decides how far shares move; and a teacher that
keeps failing sees its share go to zero, where Exp3's uniform exploration keeps every teacher at
gamma/K or more for ever (the Knowledge Purification result, that routing to fewer teachers can
beat mixing, asks for zero).
The fixed policy keeps the given shares and records the same evidence, for comparison.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

POLICIES = ("fixed", "learned")
DRAWS = 20_000  # Monte Carlo draws per share estimate: standard error under 0.004
LOSS_TOLERANCE = 1e-4  # eval-loss changes smaller than this count for nobody


def evidence(served: Mapping[str, str], before: Mapping[str, float | None], after: Mapping[str, float | None],
             targeted: Mapping[str, set[str]], added: Mapping[str, int], *, names: Iterable[str],
             valid_loss_delta: float | None, assigned: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Per teacher, what its previous round's work did for the student.

    served: failure id -> the teacher that answered it; before/after: the failure's score in the round
    that sent it and in the next; targeted: teacher -> failures it added at least one record for;
    added: teacher -> records it added; valid_loss_delta: next round's eval loss minus this one's;
    assigned: failure id -> the teacher it was sent to (a failure another teacher had to serve, because
    this one failed every request, is a failed trial of the one it was sent to)."""
    total_added = sum(added.values())
    out = {}
    for name in names:
        sent = sorted(f for f, t in served.items() if t == name)
        hit = [f for f in sent if f in targeted.get(name, set())]
        deltas = [after[f] - before[f] for f in hit  # type: ignore[operator]
                  if before.get(f) is not None and after.get(f) is not None]
        improved = sum(d > 0 for d in deltas)
        passed_on = sum(1 for f, t in (assigned or {}).items() if t == name and served.get(f) not in (None, name))
        successes, failures = float(improved), float(len(deltas) - improved + len(sent) - len(hit) + passed_on)
        weight = added.get(name, 0) / total_added if total_added else 0.0
        if valid_loss_delta is not None and weight:
            if valid_loss_delta < -LOSS_TOLERANCE:
                successes += weight
            elif valid_loss_delta > LOSS_TOLERANCE:
                failures += weight
        out[name] = {"sent": len(sent), "passed_on": passed_on, "targeted": len(hit), "scored": len(deltas),
                     "improved": improved,
                     "mean_delta": round(sum(deltas) / len(deltas), 6) if deltas else None,
                     "added": added.get(name, 0), "valid_loss_delta": valid_loss_delta,
                     "successes": round(successes, 6), "failures": round(failures, 6)}
    return out


def posterior(history: Iterable[Mapping[str, Mapping]], names: Iterable[str]) -> dict[str, list[float]]:
    """Beta(1 + successes, 1 + failures) per teacher over every round's evidence."""
    post = {n: [1.0, 1.0] for n in names}
    for ev in history:
        for name, row in ev.items():
            if name in post:
                post[name][0] += row["successes"]
                post[name][1] += row["failures"]
    return {n: [round(a, 6), round(b, 6)] for n, (a, b) in post.items()}


def thompson_shares(post: Mapping[str, list[float]], *, seed: int, round_index: int) -> dict[str, float]:
    """Each teacher's probability of having the best Beta draw (3 decimals; ties go to the first)."""
    import numpy as np

    names = list(post)
    rng = np.random.default_rng([seed, round_index, 19])
    draws = np.stack([rng.beta(post[n][0], post[n][1], size=DRAWS) for n in names], axis=1)
    wins = np.bincount(draws.argmax(axis=1), minlength=len(names)) / DRAWS
    shares = {n: round(float(w), 3) for n, w in zip(names, wins, strict=True)}
    if not any(shares.values()):  # cannot happen with DRAWS > 0; keep apportion's contract anyway
        shares = dict.fromkeys(names, 1.0)
    return shares
