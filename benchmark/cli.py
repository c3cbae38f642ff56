"""Command line: ``python run_benchmark.py <command> ...`` (no command: the smoke run).

Bad input is reported as one line on stderr with exit code 2 and no traceback
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

from benchmark.errors import BenchError
from benchmark.logs import setup_logging
from benchmark.paths import REPO_ROOT

DEFAULT_CONFIG = REPO_ROOT / "configs" / "smoke" / "default.yaml"
log = logging.getLogger("purifybench")


def cmd_run(args: argparse.Namespace) -> int:
    from benchmark.experiment import load_config
    from benchmark.runner import Runner

    overrides = _overrides(args.set or [])
    if args.n_eval is not None:
        overrides["eval.n"] = args.n_eval
    whole = cfg = load_config(args.config, overrides)
    if args.part is not None:
        from benchmark.experiment import select_part

        cfg = select_part(cfg, args.part, f"{args.config}: --part")
    out = Path(args.out) if args.out else REPO_ROOT / "results" / cfg.name
    runner = Runner(cfg, out, device=args.device, force=args.force, progress=_progress(args),
                    config_path=str(args.config), keep_going=args.keep_going, replace=args.replace,
                    plan_only=args.plan)
    if args.plan:
        from benchmark.plan import Planner, format_plan

        print(format_plan(runner, Planner(runner), str(args.config)))
        if whole.parts and args.part is None:
            from benchmark.plan import format_parts

            print(format_parts(whole, str(args.config)))
        return 0
    from benchmark import distributed

    cluster = _cluster_options(args)
    if cluster is not None:
        if distributed.active():
            raise BenchError("--executor and torchrun do not combine: run the submitting command as one process")
        cluster.validate()
    runner.preflight()  # bad input fails here, before anything is written
    setup_logging(out)
    log.info("run %s (profile %s) on %s -> %s%s", args.config, cfg.profile, runner.device, out,
             f" through the {cluster.executor} executor" if cluster else "")
    t0 = time.perf_counter()
    try:
        with _logs_through_bars(runner.progress):
            if cluster is not None:
                from benchmark.cluster import submit

                summary = submit(runner, cluster, device=args.device)
            else:
                summary = runner.run()
        main = distributed.is_main()  # (under torchrun: known only while the process group exists)
    finally:
        distributed.shutdown()
    md = out / "tables" / "results.md"
    if md.is_file() and main:
        print(md.read_text(encoding="utf-8"), end="")
    log.info("done in %.1f s: %d cells planned, %d computed; results in %s", time.perf_counter() - t0,
             summary["planned"], summary["computed"], out)
    if summary.get("busy"):
        log.warning("%d cells or checks were left to other workers that hold their locks: %s; run `report` "
                    "(or this command again) once they finish", len(summary["busy"]), ", ".join(summary["busy"]))
    if summary.get("failed"):
        raise BenchError(f"{len(summary['failed'])} cluster task(s) failed: " + "; ".join(summary["failed"]))
    if not args.no_report and main and not summary.get("busy"):
        _report_and_hint(out, cfg, str(runner.device), summary.get("computed", 1))
    if cfg.part_of and main:
        from benchmark.plan import merge_command

        print(f"Part {args.part} of {', '.join(whole.parts)}; when every part has run (default folders), merge "
              f"them:\n  {merge_command(whole)}")
    return 0


def _report_and_hint(out: Path, cfg, device: str, computed: int = 1) -> None:
    """The run's report (tables, presets, adaptive table, figures, the UMAP of the rows the config's
    ``report.umap`` names, index.html), and where to look."""
    from benchmark.reports import write_report

    t0 = time.perf_counter()
    scores = out / "report" / "figures" / "umap_restored.json"
    if cfg.report.umap and (computed or not scores.is_file()):  # (a rerun that computed nothing keeps it)
        from benchmark.runner import describe_error
        from benchmark.umap_report import write_umap

        try:
            write_umap(out, cfg.report.umap, cfg.report.umap_n, device=device, steps=cfg.report.umap_steps)
        except Exception as exc:  # noqa: BLE001 - the run is done: its report must still be written
            log.warning("UMAP of %s not drawn (%s); the rest of the report follows", ", ".join(cfg.report.umap),
                        describe_error(exc))
    write_report(out)
    index = (out / "report" / "index.html").resolve()
    log.info("report written in %.1f s", time.perf_counter() - t0)
    print(f"\nReport: {index}\nOpen it:  python -m webbrowser {index.as_uri()}")
    if not cfg.report.umap:
        print(f"UMAP of the restored representations (Figure 5): python run_benchmark.py umap {out}")


def _cluster_options(args: argparse.Namespace):
    given = {k: getattr(args, k) for k in ("partition", "jobs", "array_parallelism", "time_min", "gpus_per_job",
                                           "cpus_per_job", "mem_gb", "slurm_arg") if getattr(args, k) is not None}
    if args.executor is None:
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise BenchError(f"{flag} needs --executor slurm or --executor local")
        return None
    from benchmark.cluster import ClusterOptions, parse_slurm_args

    return ClusterOptions(
        executor=args.executor, partition=args.partition, jobs=args.jobs, array_parallelism=args.array_parallelism,
        timeout_min=args.time_min if args.time_min is not None else 24 * 60, gpus_per_job=args.gpus_per_job,
        cpus_per_job=args.cpus_per_job, mem_gb=args.mem_gb, slurm_args=parse_slurm_args(args.slurm_arg))


def cmd_report(args: argparse.Namespace) -> int:
    from benchmark.reports import write_report

    if len(args.run_dir) > 1 or args.out:
        from benchmark.merge import merge_runs

        if not args.out:
            raise BenchError("report: several runs are merged into one folder: give --out DIR")
        merge_runs([Path(r) for r in args.run_dir], Path(args.out))
        run_dir = Path(args.out)
    else:
        run_dir = Path(args.run_dir[0])
    if not run_dir.exists():
        raise BenchError(f"{run_dir} does not exist (give the folder a run wrote, e.g. results/smoke-default)")
    if not (run_dir / "records").is_dir():
        raise BenchError(f"{run_dir} is not a run folder (no records/ inside)")
    paths = write_report(run_dir, preset=args.preset, include_stale=args.include_stale)
    if not paths:
        raise BenchError(f"{run_dir}/records holds no valid record")
    for p in paths:
        print(p)
    return 0


def cmd_umap(args: argparse.Namespace) -> int:
    from benchmark.umap_report import write_umap

    run_dir = Path(args.run_dir)
    if not (run_dir / "manifest.json").is_file():
        raise BenchError(f"{run_dir} is not a run folder (no manifest.json inside)")
    steps = args.steps
    if steps is None:  # the run's own (its config's report.umap_steps), as its closing report drew it
        import json

        report = json.loads((run_dir / "manifest.json").read_text()).get("config", {}).get("report") or {}
        steps = int(report.get("umap_steps", 20))
    if steps < 1:
        raise BenchError(f"umap --steps: must be >= 1, got {steps}")
    for p in write_umap(run_dir, args.defenses, args.n, device=args.device, dataset=args.dataset,
                        target=args.target, steps=steps):
        print(p)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from benchmark.checkpoint import save_checkpoint
    from benchmark.config import from_dict
    from benchmark.data import load_dataset
    from benchmark.experiment import classifier_card
    from benchmark.models import create_model
    from benchmark.runtime import resolve_device
    from benchmark.training import TrainConfig, train_classifier

    device = resolve_device(args.device)
    train_opts = {k: v for k, v in {
        "method": args.method, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "eps": args.eps, "step_size": args.step_size, "attack_steps": args.attack_steps, "beta": args.beta,
        "schedule": args.schedule, "seed": args.seed, "eval_n": args.n_eval, "eval_pgd_steps": args.pgd_steps,
        "progress": _progress(args),
    }.items() if v is not None}
    cfg = from_dict(TrainConfig, train_opts, "train (command line)")
    ds_opts = {"size": args.size} if args.size is not None else {}
    train = load_dataset(args.dataset, "train", n=args.n_train, seed=args.seed, root=args.root,
                         download=args.download, **ds_opts)
    test = load_dataset(args.dataset, "test", root=args.root, download=args.download, **ds_opts)
    model = create_model(args.arch, num_classes=train.num_classes, in_channels=train.channels,
                         mean=train.mean, std=train.std)
    setup_logging(None)
    log.info("training %s on %s (%d images, %s) with %s for %d epochs on %s", args.arch, args.dataset,
             len(train), train.copy, cfg.method, cfg.epochs, device)
    torch.manual_seed(cfg.seed)
    result = train_classifier(model, train, cfg, device, eval_data=test, desc=f"{args.dataset}/{cfg.method}")
    m = result.metrics
    print(f"{args.dataset} {args.arch} {cfg.method}: {result.seconds_per_epoch:.2f} s/epoch, "
          f"clean {100 * m['clean_acc']:.2f}%, PGD-{m['pgd_steps']} {100 * m.get('pgd_acc', float('nan')):.2f}% "
          f"(n={m['n_eval']}, eps={cfg.eps:.4f}, {test.copy})")
    if args.out:
        path = save_checkpoint(model, args.out, classifier_card(args.arch, train, cfg, result, device))
        print(f"saved {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from benchmark.checkpoint import load_checkpoint, load_pretrained
    from benchmark.data import load_dataset
    from benchmark.runtime import resolve_device
    from benchmark.training import evaluate_classifier

    device = resolve_device(args.device)
    if args.pretrained:
        model, card = load_pretrained(args.checkpoint, device)
    else:
        model, card = load_checkpoint(args.checkpoint, device)
    trained_on = card.get("dataset", {})
    dataset = args.dataset or trained_on.get("dataset")
    if not dataset:
        raise BenchError(f"checkpoint {args.checkpoint} names no dataset; pass --dataset")
    # the dataset's options, eps and step size the checkpoint was trained with, unless given
    ds_opts = dict((trained_on.get("spec") or {}).get("options") or {}) if dataset == trained_on.get("dataset") else {}
    if args.size is not None:
        ds_opts["size"] = args.size
    trained = card.get("train_config") or {}
    eps = args.eps if args.eps is not None else trained.get("eps", 8 / 255)
    step_size = args.step_size if args.step_size is not None else trained.get("step_size", 2 / 255)
    test = load_dataset(dataset, "test", root=args.root, download=args.download, **ds_opts)
    n = args.n_eval if args.n_eval is not None else min(1000, len(test))  # default: at most the split
    test = test.subset(n, args.seed)
    m = evaluate_classifier(model, test, device, eps=eps, step_size=step_size, steps=args.pgd_steps,
                            batch_size=args.batch_size, seed=args.seed)
    print(f"{args.checkpoint} on {dataset}: clean {100 * m['clean_acc']:.2f}%, "
          f"PGD-{args.pgd_steps} {100 * m.get('pgd_acc', float('nan')):.2f}% (n={m['n_eval']}, eps={eps:.4f}, "
          f"step {step_size:.4f}, {test.copy})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from benchmark.registry import REGISTRIES

    reg = REGISTRIES[args.kind]
    names = reg.names(args.pattern)
    for name in names:
        meta = reg.metadata(name)
        desc, paper = meta.get("description", ""), meta.get("paper")
        print(f"{name:24s} {desc}{f' [{paper}]' if paper else ''}".rstrip())
    if not names:
        print(f"(no {args.kind} match {args.pattern!r})")
    return 0


# `train`'s options beyond dataset, model and method: (flag, type, help); unset ones keep TrainConfig's defaults
def _number(text: str) -> float:
    """A command-line number; a fraction such as 8/255 is accepted."""
    from benchmark.config import fraction

    try:
        return fraction(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a fraction such as 8/255, got {text!r}") from None


TRAIN_OPTIONS = [
    ("--epochs", int, None), ("--batch-size", int, None), ("--lr", float, None),
    ("--eps", _number, "L-inf budget for AT and evaluation (default 8/255; 8/255 is accepted)"),
    ("--step-size", _number, None),
    ("--attack-steps", int, "PGD steps during training (default 5)"), ("--beta", float, "TRADES/MART beta (default 6)"),
    ("--pgd-steps", int, "PGD steps for the final evaluation (default 20)"),
    ("--n-train", int, "train on a deterministic subset"),
    ("--n-eval", int, "evaluate on a deterministic subset (default 1000)"),
    ("--size", int, "image size option of the dataset (digits: default 16)"), ("--root", str, "dataset folder"),
    ("--seed", int, None),
]


def build_parser() -> argparse.ArgumentParser:
    invoked = Path(sys.argv[0]).name
    p = argparse.ArgumentParser(
        prog=invoked if invoked in ("run_benchmark.py", "purifybench") else "purifybench",
        description="purifybench: benchmark denoising/purification defenses against adaptive attacks. "
        f"With no command, runs {DEFAULT_CONFIG.relative_to(REPO_ROOT)}.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_run, _add_report, _add_umap, _add_train, _add_eval, _add_list):
        add(sub)
    return p


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars only in a terminal: a log file or a CI capture gets one line per finished step."""
    return not args.no_progress and sys.stderr.isatty()


def _logs_through_bars(progress: bool):
    """Log lines printed above the progress bars (not glued to a bar's remnants)."""
    if not progress:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm(loggers=[log])


def _overrides(pairs: list[str]) -> dict:
    """``--set KEY=VALUE`` pairs: dotted keys, YAML values."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--set {pair!r}: expected KEY=VALUE, e.g. threat.eps=0.0627")
        try:
            out[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise BenchError(f"--set {pair!r}: the value is not valid YAML") from None
    return out


def _add_run(sub) -> None:
    r = sub.add_parser("run", help="run an experiment config (YAML)")
    r.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="config file (default: the smoke config)")
    r.add_argument("--out", help="results folder (default: results/<config name>)")
    r.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the config)")
    r.add_argument("--n-eval", type=int, help="number of test examples (overrides eval.n)")
    r.add_argument("--part", help="run one of the config's parts (its rows, in a job of its own; default folder "
                                  "results/<config name>-<part>); `report` merges the parts' folders")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value (repeatable; YAML values; a list item by its name or index), e.g. "
                        "--set threat.eps=0.0627 --set defenses.DIR.train.epochs=2; training eps and step size "
                        "left unset follow threat. Give each variant its own --out")
    r.add_argument("--force", action="store_true", help="recompute cells that already have a record")
    r.add_argument("--replace", action="store_true",
                   help="run into a folder that holds a run of another configuration, making this one its configuration "
                        "(cells whose identity changed are recomputed)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--no-report", action="store_true", help="do not write the report (report/index.html) at the end")
    r.add_argument("--plan", action="store_true",
                   help="validate, then print the cells to compute (and those already recorded in --out), the "
                        "artifacts to train and an estimated cost per stage on one H100; loads and writes nothing")
    r.add_argument("--keep-going", action="store_true",
                   help="an unexpected error in a training, a row's checks or a cell is logged with its traceback "
                        "and the run goes on; it still fails at the end, naming every failure")
    c = r.add_argument_group("cluster (submitit): job arrays for targets, then defenses, then cells")
    c.add_argument("--executor", choices=["slurm", "local"],
                   help="submit the matrix as job arrays on Slurm, or run the same path on this machine")
    c.add_argument("--partition", help="Slurm partition")
    c.add_argument("--jobs", type=int, help="array elements per stage at most (default: slurm one per "
                                            "artifact or row, local 1)")
    c.add_argument("--array-parallelism", type=int, help="Slurm: array elements running at once")
    c.add_argument("--time-min", type=int, help="time limit of each job in minutes (default 1440)")
    c.add_argument("--gpus-per-job", type=int, help="default: 1 on Slurm (0 with --device cpu), 0 locally")
    c.add_argument("--cpus-per-job", type=int, help="CPUs per job, also torch's thread count")
    c.add_argument("--mem-gb", type=float, help="memory per job")
    c.add_argument("--slurm-arg", action="append", metavar="KEY=VALUE",
                   help="extra sbatch option, e.g. account=abc or qos=high (repeatable)")
    r.set_defaults(func=cmd_run)


def _add_report(sub) -> None:
    rp = sub.add_parser("report", help="(re)build the tables and the report (adaptive table, paper comparison, "
                                      "timing, figures, index) of a run folder from its records")
    rp.add_argument("run_dir", nargs="+", help="a run folder; several with --out: merged into one set of tables "
                                               "(refused when a target they share differs)")
    rp.add_argument("--out", help="the folder a merge of runs is written to (records, checks, report)")
    rp.add_argument("--include-stale", action="store_true",
                    help="also show records computed under another plan of the run (named as stale in the report)")
    rp.add_argument("--preset", default="all",
                    help="all (default: everything), paper (the seed paper's tables, comparison and figures "
                         "only) or a comma list of table1..table5")
    rp.set_defaults(func=cmd_report)


def _add_umap(sub) -> None:
    u = sub.add_parser("umap", help="Figure 5: UMAP of restored representations under white-box PGD, "
                                    "from a finished run's artifacts (never trains)")
    u.add_argument("run_dir")
    u.add_argument("--defenses", nargs="+", help="rows of the run (default: all)")
    u.add_argument("--n", type=int, help="test images (default: 500, or the whole split if smaller)")
    u.add_argument("--dataset", help="dataset of the run (default: the first)")
    u.add_argument("--target", help="target of the run (default: the first)")
    u.add_argument("--device", default="auto")
    u.add_argument("--steps", type=int, help="PGD steps (default: the run's report.umap_steps, else 20)")
    u.set_defaults(func=cmd_umap)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train one target classifier and report clean and PGD accuracy")
    t.add_argument("--dataset", default="digits")
    t.add_argument("--arch", default="small-cnn")
    t.add_argument("--method", choices=["natural", "at", "trades", "mart"], default="natural")
    t.add_argument("--schedule", choices=["onecycle", "step", "constant"])
    for flag, kind, text in TRAIN_OPTIONS:
        t.add_argument(flag, type=kind, help=text)
    t.add_argument("--download", action="store_true", help="fetch the dataset when it is missing (cifar10, svhn, fashion-mnist)")
    t.add_argument("--device", default="auto")
    t.add_argument("--out", help="checkpoint stem to write (<out>.safetensors + <out>.json)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a checkpoint: clean and PGD accuracy")
    e.add_argument("checkpoint", help="checkpoint stem/.json, or a pretrained name with --pretrained")
    e.add_argument("--pretrained", action="store_true", help="CHECKPOINT is a pretrained name")
    e.add_argument("--dataset", help="default: the checkpoint's")
    e.add_argument("--root")
    e.add_argument("--download", action="store_true", help="fetch the dataset when it is missing (cifar10, svhn, fashion-mnist)")
    e.add_argument("--size", type=int, help="image size (default: the checkpoint's dataset options)")
    e.add_argument("--eps", type=_number, help="L-inf budget, e.g. 8/255 (default: the checkpoint's training eps, "
                   "else 8/255)")
    e.add_argument("--step-size", type=_number, help="PGD step, e.g. 2/255 (default: the checkpoint's, else 2/255)")
    e.add_argument("--pgd-steps", type=int, default=20, help="default: 20")
    e.add_argument("--n-eval", type=int, help="test examples (default: 1000, or the whole split if smaller)")
    e.add_argument("--batch-size", type=int, default=500, help="default: 500")
    e.add_argument("--seed", type=int, default=0, help="of the test subset and PGD's start (default: 0)")
    e.add_argument("--device", default="auto", help="default: auto")
    e.set_defaults(func=cmd_eval)


def _add_list(sub) -> None:
    ls = sub.add_parser("list", help="list registered datasets, models, defenses or attacks")
    ls.add_argument("kind", choices=["datasets", "models", "defenses", "attacks"])
    ls.add_argument("pattern", nargs="?", default="*", help="glob pattern, e.g. 'resnet*'")
    ls.set_defaults(func=cmd_list)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    debug = "--debug" in argv  # accepted anywhere on the line
    argv = [a for a in argv if a != "--debug"]
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]  # no command: the run's options apply to the smoke run
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BenchError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
