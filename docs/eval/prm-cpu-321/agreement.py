"""Held-out AUCs of a value head against two label-free signals, with 95% intervals from
resampling questions (2,000 bootstrap draws).

usage: python3 agreement.py HEAD.labels.jsonl[.xz] SAMPLES

- head: the value `arbor prm train` wrote for each held-out step (HEAD.labels.jsonl);
- confidence: the policy's mean token probability over the step;
- agreement: for a final step, the share of the question's sampled solutions whose final answer
  is the same number (self-consistency), out of the SAMPLES solutions sampled per question;
  the number is the last one in the final step's text, which is how GSM8K answers end.
Reasoned final steps are final steps of solutions of two or more steps.
"""
import collections, json, lzma, random, re, sys

def answer(text):
    m = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return m[-1].replace(",", "").rstrip(".") if m else None

def auc(rows, key):
    pos = [r[key] for r in rows if r["right"]]
    neg = [r[key] for r in rows if not r["right"]]
    if not pos or not neg:
        return float("nan")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / len(pos) / len(neg)

opener = lzma.open if sys.argv[1].endswith(".xz") else open
labelled = [json.loads(l) for l in opener(sys.argv[1], "rt") if l.strip()]
samples = int(sys.argv[2])
finals = collections.defaultdict(list)
for e in labelled:
    if e["final"]:
        finals[e["question"]].append(answer(e["text"]))
rows = []
for e in labelled:
    if not e["held_out"]:
        continue
    row = {"q": e["question"], "final": e["final"], "reasoned": e["final"] and e["step"] >= 1,
           "right": e["share"] > 0, "head": e["value"], "confidence": e["log_prob_confidence"]}
    if e["final"]:
        a = answer(e["text"])
        row["agreement"] = sum(1 for b in finals[e["question"]] if a is not None and b == a) / samples
    rows.append(row)

def interval(subset, key):
    by_q = collections.defaultdict(list)
    for r in subset:
        by_q[r["q"]].append(r)
    qs = list(by_q)
    rng = random.Random(0)
    draws = sorted(
        v for v in (auc([r for q in rng.choices(qs, k=len(qs)) for r in by_q[q]], key)
                    for _ in range(2000)) if v == v)
    return auc(subset, key), draws[int(0.025 * len(draws))], draws[int(0.975 * len(draws)) - 1]

print("| steps | n (right) | head | policy's confidence | agreement |")
print("|---|---|---|---|---|")
for name, subset in [("reasoned final steps", [r for r in rows if r["reasoned"]]),
                     ("intermediate steps", [r for r in rows if not r["final"]])]:
    cells = []
    for key in ["head", "confidence", "agreement"]:
        if key == "agreement" and not subset[0]["final"]:
            cells.append("n/a")
            continue
        a, lo, hi = interval(subset, key)
        cells.append(f"{a:.3f} ({lo:.2f}–{hi:.2f})")
    right = sum(r["right"] for r in subset)
    print(f"| {name} | {len(subset)} ({right}) | " + " | ".join(cells) + " |")
