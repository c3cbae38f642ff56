"""Wall time of a matrix run split into training and evaluation, from its folder.

    python benchmarks/matrix_time.py RUN_DIR

Training: every target and defense artifact the run made (their cards' ``seconds``; an artifact
reused from an earlier call counts where it was made); evaluation: the cells' wall seconds
(records), per attack and in all. With ``console.log`` from ``benchmarks/quick_run.sh`` the
run's whole wall time is printed too (data decoding and start-up are the remainder). The speed
target for the quick Table 1 profile on one H100: <= 25 minutes, training included.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from benchmark.records import load_records


def main() -> None:
    run = Path(sys.argv[1])
    training = []
    for card in sorted((run / "artifacts").glob("*/*.json")):
        d = json.loads(card.read_text())
        if d.get("kind") == "classifier":  # a target (its card says how long its training took)
            seconds, kind, name = (d.get("training") or {}).get("seconds"), "target", card.stem
        else:  # a defense: DIR's shared pre-training is inside its fit seconds (once, where it ran)
            seconds, kind, name = (d.get("fit") or {}).get("seconds"), "defense", d.get("name") or card.stem
        if seconds is not None:
            training.append((kind, name, float(seconds)))
    per_attack = defaultdict(float)
    records = load_records(run)
    for r in records:
        per_attack[r.column] += float(r.seconds or 0)
    train_total, eval_total = sum(s for *_, s in training), sum(per_attack.values())
    print(f"run: {run} ({len(records)} cells)\n")
    print("| part | seconds |\n|---|---:|")
    for kind, name, s in training:
        print(f"| train {kind} {name} | {s:.1f} |")
    for attack, s in sorted(per_attack.items(), key=lambda kv: -kv[1]):
        print(f"| evaluate {attack} (all rows) | {s:.1f} |")
    print(f"| **training** | **{train_total:.1f}** |\n| **evaluation** | **{eval_total:.1f}** |")
    log = run / "console.log"
    if log.is_file():
        m = re.search(r"wall seconds: (\d+)", log.read_text())
        if m:
            wall = int(m.group(1))
            print(f"| **whole run (wall)** | **{wall}** ({wall / 60:.1f} min; other {wall - train_total - eval_total:.0f} s) |")


if __name__ == "__main__":
    main()
