"""Accuracy of answer selection over the 8 sampled solutions of each held-out question, from the
labelled steps (labels.jsonl.xz): majority vote, the vote weighted by the head's values
(weighted best-of-N), the single answer the head values most (best-of-N), and the oracle
(pass@8: any sample right). Ties go to the larger summed value. 95% intervals from resampling
questions (2,000 draws); the differences are paired on the same questions.

usage: python3 votes.py labels.jsonl.xz
"""
import collections, json, lzma, random, re, sys

def answer(text):
    m = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return m[-1].replace(",", "").rstrip(".") if m else None

finals = collections.defaultdict(list)  # question -> [(answer, value, right)]
for line in lzma.open(sys.argv[1], "rt"):
    e = json.loads(line)
    if e["held_out"] and e["final"]:
        finals[e["question"]].append((answer(e["text"]), e["value"], e["share"] > 0))

def pick(samples, how):
    votes = collections.defaultdict(lambda: [0, 0.0, False])
    for a, v, right in samples:
        if a is None:
            continue
        votes[a][0] += 1
        votes[a][1] += v
        votes[a][2] = right
    if not votes:
        return False
    if how == "majority":
        key = lambda a: (votes[a][0], votes[a][1])
    elif how == "weighted":
        key = lambda a: votes[a][1]
    elif how == "best":
        best = max((s for s in samples if s[0] is not None), key=lambda s: s[1])
        return best[2]
    else:
        return any(r for _, _, r in samples)
    return votes[max(votes, key=key)][2]

qs = sorted(finals)
hows = ["majority", "weighted", "best", "oracle"]
right = {h: {q: pick(finals[q], h) for q in qs} for h in hows}
rng = random.Random(0)
draws = [rng.choices(qs, k=len(qs)) for _ in range(2000)]

def interval(f):
    vals = sorted(sum(f(q) for q in d) / len(d) for d in draws)
    return vals[50], vals[1949]

print(f"{len(qs)} held-out questions with a finished sample")
print("| selection | accuracy | 95% interval | against majority (paired) |")
print("|---|---|---|---|")
for h in hows:
    acc = sum(right[h].values()) / len(qs)
    lo, hi = interval(lambda q: right[h][q])
    dlo, dhi = interval(lambda q: right[h][q] - right["majority"][q])
    diff = acc - sum(right["majority"].values()) / len(qs)
    print(f"| {h} | {acc:.1%} | {lo:.1%}–{hi:.1%} | {diff:+.1%} ({dlo:+.1%} to {dhi:+.1%}) |")
