"""The speed figures as data: collect a gpu_speed.sh run into one JSON file, render the files into RESULTS.md.

    python benchmarks/gpu_figures.py collect OUTDIR [--into benchmarks/gpu]
    python benchmarks/gpu_figures.py render [--results benchmarks/RESULTS.md]

``collect`` merges the figures each step of ``gpu_speed.sh`` wrote under OUTDIR (``--json`` of the
benchmark scripts, the CUDA smoke's time) with what says where they come from (device, commit,
torch, date, steps skipped at the deadline or failed) into ``<into>/<YYYY-MM-DD>-<gpu-model>.json``
(a second run that day on that GPU model: ``-2``, ...), and a copy ``OUTDIR/gpu-figures.json``.
``render`` rewrites the section of RESULTS.md between its
markers from every file in benchmarks/gpu: one row per file, each target judged only when the
figure was measured at the size the target is set for.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmark.io import atomic_write_text  # noqa: E402
from benchmark.runtime import git_commit  # noqa: E402

GPU_DIR = ROOT / "benchmarks" / "gpu"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
COPY = "gpu-figures.json"
BEGIN, END = "<!-- gpu-figures:begin (benchmarks/gpu_figures.py render) -->", "<!-- gpu-figures:end -->"


def _at_size(conditions: dict, n: int, steps: int) -> bool:
    return conditions.get("n") == n and conditions.get("steps") == steps


# name, column, format, target (value -> met?), the size the target is set for (conditions -> judged?)
TARGETS = [
    ("pgd20_resnet18_10k_seconds", "PGD-20, 10k images (s)", "{:.2f}", lambda v: v <= 3.0,
     lambda c: _at_size(c, n=10_000, steps=20), "<= 3 s"),
    ("pgd20_vs_torchattacks", "vs torchattacks", "{:.1f}x", lambda v: v >= 5.0,
     lambda c: _at_size(c, n=10_000, steps=20), ">= 5x"),
    ("pgd20_robust_acc_diff_vs_fp32_points", "acc. diff vs fp32 (points)", "{:.2f}", lambda v: v <= 0.3,
     lambda c: True, "<= 0.3"),
    ("apgd_ce_vs_pyautoattack", "APGD-CE / ours (time)", "{:.1f}x", None, None, "-"),
    ("pgd20_dir_seconds", "PGD-20 through DIR (s)", "{:.2f}", None, None, "-"),
    ("aa_rand_dir_1k_seconds", "AA-rand through DIR, per 1k images (s)", "{:.0f}", None, None, "-"),
    ("aa_rand_native_vs_pyautoattack", "AA-rand: pyautoattack / ours (time)", "{:.1f}x", None, None, "-"),
    ("at_epoch_seconds", "PGD-5 AT epoch @50k (s)", "{:.1f}", lambda v: v <= 6.0,
     lambda c: c.get("scaled_to") == 50_000 and c.get("images", 0) >= 10_000, "<= 6 s"),
    ("dir_main_epoch_seconds", "DIR main epoch @50k (s)", "{:.1f}", lambda v: 527 / v >= 10,
     lambda c: c.get("scaled_to") == 50_000 and c.get("images", 0) >= 10_000, ">= 10x faster than 527 s"),
    ("cuda_smoke_seconds", "CUDA smoke (s)", "{:.0f}", lambda v: v <= 180, lambda c: True, "<= 180 s"),
    ("deterministic_same_hash", "deterministic target: same weights twice", "yes/no", lambda v: v == 1,
     lambda c: True, "yes"),
    ("determinism_cost_ratio", "determinism: time per epoch", "{:.2f}x", None, None, "-"),
]
MEMORY = "gradient_peak_mib."  # benchmarks/exact_memory.py: gradient_peak_mib.<config>.<row>.<bpda|exact>


def _format(fmt: str, value: float) -> str:
    return ("yes" if value == 1 else "no") if fmt == "yes/no" else fmt.format(value)


def _device() -> tuple[str, str]:
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return name, torch.__version__


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def collect(outdir: Path, into: Path) -> Path:
    if not outdir.is_dir():
        raise SystemExit(f"gpu_figures.py collect: {outdir} is not a folder")
    merged: dict = {"figures": {}, "conditions": {}, "rows": []}
    for part in sorted(outdir.glob("*.json")):
        if part.name == COPY:
            continue
        try:
            data = json.loads(part.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"gpu_figures.py collect: {part} is not JSON ({exc})") from None
        merged["figures"].update(data.get("figures", {}))
        merged["conditions"].update(data.get("conditions", {}))
        merged["rows"] += [r | {"step": part.stem} for r in data.get("rows", [])]
    device, torch_version = _device()
    notes = {name: (outdir / f"{name}.txt").read_text().strip().splitlines()
             for name in ("skipped", "failed", "missing") if (outdir / f"{name}.txt").is_file()}
    today = datetime.date.today().isoformat()
    doc = {"date": today, "device": device, "commit": git_commit(), "torch": torch_version, **merged, **notes}
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    path, k = into / f"{today}-{slug(device)}.json", 1
    while path.exists():  # another run that day on that GPU model: a file of its own
        k += 1
        path = into / f"{today}-{slug(device)}-{k}.json"
    into.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    atomic_write_text(outdir / COPY, text)
    print(f"figures: {path}")
    for name, value in sorted(doc["figures"].items()):
        print(f"  {name}: {value:.4g}")
    return path


def render_table(files: list[Path]) -> str:
    head = ["date", "device", "commit"] + [col for _, col, *_ in TARGETS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * len(TARGETS),
             "| target | | | " + " | ".join(t[5] for t in TARGETS) + " |"]
    for path in files:
        doc = json.loads(path.read_text())
        cells = [doc.get("date", "?"), doc.get("device", "?"), (doc.get("commit") or "?")[:7]]
        for name, _, fmt, target, judged, _ in TARGETS:
            value = doc.get("figures", {}).get(name)
            if value is None:
                cells.append("-")
                continue
            text = _format(fmt, value)
            cond = doc.get("conditions", {}).get(name, {})
            if target is not None and judged(cond):
                text += "" if target(value) else " **(missed)**"
            elif target is not None:
                text += " (not at target size)"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    docs = {p.name: json.loads(p.read_text()) for p in files}
    notes = "\n".join(f"- {name}: {line.strip('* ')}" for name, doc in docs.items()
                      for line in (doc.get("skipped", []) + doc.get("failed", []) + doc.get("missing", [])
                                   + doc.get("notes", [])))
    return ("Rendered from `benchmarks/gpu/*.json` (written by `bash benchmarks/gpu_speed.sh --smoke OUTDIR`; each "
            "file also holds how each figure was measured and every table row). A missed target is marked; a "
            "figure measured at another size than its target's is not judged.\n\n" + "\n".join(lines)
            + memory_table(docs)
            + ("\n\nSteps skipped, stopped or failed, and notes:\n" + notes if notes else "") + "\n")


def memory_table(docs: dict[str, dict]) -> str:
    """Peak memory of one input gradient through each exact-gradient row, BPDA against exact
    (``gradient_peak_mib.*`` figures), one line per file and row."""
    lines = []
    for doc in docs.values():
        figures = doc.get("figures", {})
        rows = sorted({name[len(MEMORY):].rsplit(".", 1)[0] for name in figures if name.startswith(MEMORY)})
        for row in rows:
            bpda, exact = (figures.get(f"{MEMORY}{row}.{mode}") for mode in ("bpda", "exact"))
            cond = doc.get("conditions", {}).get(f"{MEMORY}{row}.exact", {})
            config, name = row.split(".", 1)
            cells = [doc.get("date", "?"), doc.get("device", "?"), config, name, str(cond.get("batch", "?")),
                     "-" if bpda is None else f"{bpda:.0f}", "-" if exact is None else f"{exact:.0f}",
                     f"{exact / bpda:.1f}x" if bpda and exact is not None else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    return ("\n\nPeak memory of one input gradient (MiB above the allocation before it; "
            "`benchmarks/exact_memory.py`):\n\n| date | device | config | row | batch | BPDA | exact | exact / BPDA |\n"
            "|---|---|---|---|---:|---:|---:|---:|\n" + "\n".join(lines))


def render(results: Path, gpu_dir: Path) -> None:
    files = sorted(gpu_dir.glob("*.json"))
    text = results.read_text() if results.is_file() else "# Measured results\n"
    section = f"{BEGIN}\n{render_table(files) if files else 'No GPU figures yet.'}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## GPU speed figures\n\n" + section + "\n"
    atomic_write_text(results, text)
    print(f"rendered {len(files)} file(s) into {results}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("outdir", type=Path)
    c.add_argument("--into", type=Path, default=GPU_DIR)
    r = sub.add_parser("render")
    r.add_argument("--results", type=Path, default=RESULTS)
    r.add_argument("--gpu-dir", type=Path, default=GPU_DIR)
    args = ap.parse_args()
    if args.command == "collect":
        collect(args.outdir, args.into)
    else:
        render(args.results, args.gpu_dir)


if __name__ == "__main__":
    main()
