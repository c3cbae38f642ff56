"""The CPU factors of ``benchmark/costs.yaml`` (``cpu_target``, ``cpu_defense``, ``cpu_checks``,
``cpu_cells``), measured from a finished run on the CPU.

For every stage of the run's plan, the measured seconds (a target's and a defense's training from
their artifact cards, a row's checks from the run log, a row's cells from their records) over the
plan's H100 estimate; one factor per stage kind and defense (a target: its training method), and
each section's ``default`` (for defenses the run did not have) from the section's totals. Prints
the sections as YAML to paste into ``costs.yaml``; nothing is written.

    python run_benchmark.py run configs/smoke/default.yaml --out /tmp/smoke   # on the 2-core machine
    python benchmarks/cpu_factors.py /tmp/smoke configs/smoke/default.yaml --label "2-core CI machine, <commit>"
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark.experiment import load_config  # noqa: E402
from benchmark.plan import Planner  # noqa: E402
from benchmark.runner import Runner  # noqa: E402

KINDS = ("target", "defense", "checks", "cells")


def measured(run: Path, kind: str, what: str) -> float | None:
    """Seconds the run spent on the stage ``kind``/``what`` (as the plan names it), or None."""
    if kind == "target":
        ds, name = what.split("/")
        cards = [c for c in (run / "artifacts" / "targets").glob(f"{ds}-{name}-*.json")
                 if re.fullmatch(rf"{re.escape(ds)}-{re.escape(name)}-[0-9a-f]+\.json", c.name)]
        return sum(json.loads(c.read_text())["training"]["seconds"] for c in cards) if cards else None
    if kind == "defense":
        ds, name = what.split("/", 1)
        cards = [c for c in (run / "artifacts" / "defenses").glob(f"{ds}-{name}-*.json")
                 if json.loads(c.read_text()).get("name") == name]
        return sum(json.loads(c.read_text())["fit"]["seconds"] for c in cards) if cards else None
    if kind == "checks":
        found = re.findall(rf"checks {re.escape(what)}: .*\(([0-9.]+) s\)$", (run / "run.log").read_text(), re.M)
        return float(found[-1]) if found else None
    ds, target, row = what.split("/", 2)
    seconds = [json.loads(r.read_text())["seconds"] for r in (run / "records").glob(f"{ds}__{target}__{row}__*.json")
               if json.loads(r.read_text())["cell"]["defense"] == row]
    return sum(seconds) if seconds else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished run folder (artifacts, records, run.log)")
    ap.add_argument("config", help="the config it ran")
    ap.add_argument("--label", default="the CPU this ran on", help="where the figures were measured")
    args = ap.parse_args()
    cfg = load_config(args.config)
    # the plan of the whole run, as a fresh run folder would have it (every stage still to do)
    stages = Planner(Runner(cfg, Path("/nonexistent/plan-only"), device="cpu")).stages()
    # a stage name can come back (a defense trained for each of several targets): measured once, against
    # the sum of its estimates
    planned: dict[tuple[str, str], list] = {}
    for s in stages:
        if s.kind in KINDS:
            planned.setdefault((s.kind, s.what), []).append(s)
    spent: dict[str, dict[str, float]] = {k: defaultdict(float) for k in KINDS}
    estimated: dict[str, dict[str, float]] = {k: defaultdict(float) for k in KINDS}
    for (kind, what), group in planned.items():
        sec = measured(args.run, kind, what)
        if sec is None:
            print(f"# {kind} {what}: not found in {args.run}; left out", file=sys.stderr)
            continue
        spent[kind][group[0].about] += sec
        estimated[kind][group[0].about] += sum(s.seconds for s in group)
    for kind in KINDS:
        if not spent[kind]:
            continue
        print(f"cpu_{kind}:")
        for key in sorted(spent[kind]):
            x = spent[kind][key] / estimated[kind][key]
            print(f"  {key}: {{x: {x:.3g}, measured: \"{args.label}, {spent[kind][key]:.1f} s against "
                  f"{estimated[kind][key]:.1f} s\"}}")
        total = sum(spent[kind].values()) / sum(estimated[kind].values())
        print(f"  default: {{x: {total:.3g}, guess: true}}  # the section's totals ({args.label})")


if __name__ == "__main__":
    main()
