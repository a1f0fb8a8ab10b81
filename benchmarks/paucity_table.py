"""Print a `landscape finetune` summary CSV as the README's markdown table.

    python benchmarks/paucity_table.py out/real/lora/smollm2_lora_paucity.csv [--metric accuracy]

One row per regularizer: mean [q25, q75] per fraction, then per fraction the paired difference
from dropout, mean [bootstrap 95% CI] and Wilcoxon p, and whether the cell's pairs could have
reached p < 0.05 at all (the smallest p n pairs allow is 2/2^n).  Every number is read from the CSV.
"""

import argparse
import csv


def _f(value, spec):
    return "" if value in ("", None) else format(float(value), spec).replace("-", "−")


def table(rows, metric):
    rows = [r for r in rows if r["metric"] == metric]
    fractions = sorted({float(r["fraction"]) for r in rows}, reverse=True)
    regs = list(dict.fromkeys(r["regularizer"] for r in rows))
    cell = {(r["regularizer"], float(r["fraction"])): r for r in rows}
    pct = [f"{100 * f:g}%" for f in fractions]
    head = ["regularizer", *pct, *[f"{p}: diff vs dropout" for p in pct], "could reach p < 0.05?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for reg in regs:
        means, diffs, reach = [], [], set()
        for f in fractions:
            r = cell.get((reg, f))
            if r is None:
                means.append("-")
                diffs.append("")
                continue
            means.append(f"{float(r['mean']):.3f} [{float(r['q25']):.3f}, {float(r['q75']):.3f}] (n={r['runs']})")
            if r.get("diff_vs_dropout", "") == "":
                diffs.append("")
                continue
            diffs.append(f"{_f(r['diff_vs_dropout'], '+.3f')} [{_f(r['ci_low'], '+.3f')}, {_f(r['ci_high'], '+.3f')}] "
                         f"p {_f(r['p_value'], '.3f')}" + (" *" if r.get("significant") == "True" else ""))
            pairs = int(float(r["pairs"]))
            reach.add(f"{'yes' if 2 / 2 ** pairs < 0.05 else 'no'}: {pairs} pairs, smallest p {2 / 2 ** pairs:.3g}"
                      if pairs >= 2 else f"no: {pairs} pair")
        lines.append("| " + " | ".join([reg, *means, *diffs, "; ".join(sorted(reach)) or "(baseline)"]) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", help="summary CSV written by `landscape finetune --out`")
    parser.add_argument("--metric", default="accuracy")
    args = parser.parse_args()
    with open(args.summary, newline="") as handle:
        print(table(list(csv.DictReader(handle)), args.metric))


if __name__ == "__main__":
    main()
