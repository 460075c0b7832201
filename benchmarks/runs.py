"""What the minicity benchmark scripts share: one resumable training run through the recipe (the
code path of `python -m synseg_jax.main`), its last-step scores, and table formatting."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

from synseg_jax import evaluate, recipe, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL, HELD_OUT = "minicity/real_val", "minicity/sim[90%:]"  # the demo's eval and extra split


def load_config(config_file: str, parts: list[str]):
    return recipe.load_config_file(os.path.join(REPO, "configs", config_file),
                                   ",".join(p for p in parts if p))


def run_once(config, workdir: str, record: dict) -> dict:
    """Trains and evaluates `config` in `workdir` unless a finished record is there; returns the
    record with the wall time of training + evaluation and the last-step scores. Demo pretraining
    happens before the clock starts (it is timed on its own)."""
    result_path = os.path.join(workdir, "result.json")
    if not os.path.exists(result_path):
        config = recipe.ensure_pretrained(config, workdir)
        made_by = provenance()  # the code that starts the run, not what HEAD is when it ends
        start = time.time()
        train.train_and_evaluate(config, workdir)
        record = {**record, "steps": config.train.steps, "wall_s": time.time() - start,
                  "provenance": made_by}
        with open(result_path, "w") as f:
            json.dump(record, f, indent=2)
    with open(result_path) as f:
        record = json.load(f)
    record["scores"] = last_scores(workdir)
    return record


def recipe_args(description: str) -> argparse.Namespace:
    """The command line of the whole-recipe benchmarks (one recipe per seed): --workdir,
    --seeds, --data_dir (default <workdir>/tfds), --pretrain_workdir, --overrides; paths made
    absolute."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data_dir", default="", help="TFDS data dir (default <workdir>/tfds)")
    parser.add_argument("--pretrain_workdir", default="", help="a demo pretraining to reuse")
    parser.add_argument("--overrides", default="", help="extra key=value,... for every run")
    add_archive_flag(parser)
    args = parser.parse_args()
    args.workdir = os.path.abspath(args.workdir)
    args.data_dir = os.path.abspath(args.data_dir or os.path.join(args.workdir, "tfds"))
    args.pretrain_workdir = os.path.abspath(args.pretrain_workdir) if args.pretrain_workdir else ""
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    return args


def add_archive_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--archive", default="", type=lambda p: os.path.abspath(p) if p else "",
                        help="a JSON file of finished runs' records (benchmarks/results/<table>"
                             ".json): runs found there are not rerun, new ones are added")


def seed_config(config_file: str, seed: int, args: argparse.Namespace):
    """The demo of `config_file` for `seed`, with recipe_args' data dir, pretraining and
    overrides."""
    parts = ["demo", f"seed={seed}", f"data.data_dir={args.data_dir}", args.overrides]
    if args.pretrain_workdir:
        parts.append(f"pretrain.workdir={args.pretrain_workdir}")
    return load_config(config_file, parts)


def timed_recipe(config, workdir: str) -> dict:
    """Runs the recipe in `workdir` unless its result.json exists; returns that record: wall
    time (None for a run resumed after a kill: its clock would miss the stages done before),
    the stages it resumed after, provenance and steps. The demo pretraining is made before the
    clock starts."""
    result_path = os.path.join(workdir, "result.json")
    if not os.path.exists(result_path):
        config = recipe.ensure_pretrained(config, workdir)
        resumed = [name for name in recipe.stage_names(config)
                   if os.path.exists(os.path.join(workdir, name, recipe.DONE))]
        made_by = provenance()
        start = time.time()
        recipe.run(config, workdir)
        record = {"wall_s": None if resumed else time.time() - start, "resumed_after": resumed,
                  "provenance": made_by, "steps": config.train.steps}
        with open(result_path, "w") as f:
            json.dump(record, f, indent=2)
    with open(result_path) as f:
        return json.load(f)


def archived_records(path: str, jobs: dict[str, Callable[[], dict]]) -> list[dict]:
    """The records of `jobs` ({key: a function that runs it and returns its record}), in order:
    a job's record from the archive `path` if it holds the key, else the job's, which is then
    added to the archive. The archive (a JSON object, committed beside the table it makes)
    lets a table be finished across sessions and machines, whose workdirs do not survive;
    without a path every job runs (each skips what its own workdir already holds)."""
    if not path:
        return [job() for job in jobs.values()]
    archive = {}
    if os.path.exists(path):
        with open(path) as f:
            archive = json.load(f)
    for key, job in jobs.items():
        if key not in archive:
            archive[key] = job()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(archive, f, indent=1)  # key order kept: classes stay in label order
    return [archive[key] for key in jobs]


def mean_wall(records: list[dict]) -> str:
    """The mean wall time of the records that have one (resumed runs have none)."""
    walls = [r["wall_s"] for r in records if r.get("wall_s") is not None]
    if not walls:
        return "resumed runs only"
    note = f" ({len(walls)} of {len(records)} runs unresumed)" if len(walls) < len(records) else ""
    return f"{statistics.mean(walls):.0f} s{note}"


def ablation_args(description: str, rows: dict) -> tuple[argparse.Namespace, list[str], list[int]]:
    """The command line every ablation script shares: --workdir, --rows (checked against
    `rows`), --seeds, --data_dir, --overrides. Returns (args, rows, seeds)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workdir", required=True, help="one sub-workdir per row and seed")
    parser.add_argument("--rows", default=",".join(rows), help=f"subset of {','.join(rows)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--data_dir", default="", help="TFDS data dir (default: config's)")
    parser.add_argument("--overrides", default="",
                        help="extra key=value,... for every run (e.g. train.steps=4)")
    add_archive_flag(parser)
    args = parser.parse_args()
    chosen = [r for r in args.rows.split(",") if r]
    unknown = [r for r in chosen if r not in rows]
    if unknown:
        parser.error(f"unknown rows {unknown}; valid: {list(rows)}")
    return args, chosen, [int(s) for s in args.seeds.split(",") if s]


def write_report(workdir: str, name: str, text: str) -> None:
    """Writes <workdir>/<name> and prints it."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, name), "w") as f:
        f.write(text)
    print(text)


def last_scores(workdir: str) -> dict:
    """{split: {"miou": %, "per_class": {name: %}}} of each evaluated split at its last step."""
    with open(os.path.join(workdir, "eval", "summary.json")) as f:
        summary = json.load(f)
    scores = {}
    for split, entry in summary.items():
        step = entry["last"]["step"]
        path = evaluate.results_stem(workdir, split, step) + ".json"
        per_class = {}
        if os.path.exists(path):
            with open(path) as f:
                per_class = {k: 100 * (v or 0.0) for k, v in json.load(f)["per_class_iou"].items()}
        scores[split] = {"miou": 100 * entry["last"]["miou_19"], "per_class": per_class}
    return scores


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def score_cells(rs: list[dict]) -> str:
    """The table cells every benchmark row shares, for the records (seeds) of one row: seeds |
    steps | real_val mean ± std | per seed | held-out sim mean ± std | mean wall time."""
    real = [r["scores"][REAL]["miou"] for r in rs]
    sim = [r["scores"][HELD_OUT]["miou"] for r in rs if HELD_OUT in r["scores"]]
    return (f"{','.join(str(r['seed']) for r in rs)} | {rs[0]['steps']} | {mean_std(real)} | "
            f"{' / '.join(f'{m:.2f}' for m in real)} | {mean_std(sim) if sim else '-'} | "
            f"{mean_wall(rs)}")


def paired_table(rows: dict[str, list[dict]], comparisons: list[tuple[str, str]],
                 split: str = REAL) -> str:
    """Markdown table of paired differences ``a - b`` of `split` mIoU over the seeds both rows
    share (same seed: same init, data order and augmentation): mean ± std, per seed, and the
    paired t on n - 1 degrees of freedom. Comparisons missing a row are left out."""
    lines = ["| comparison | seeds | difference (mean ± std) | per seed | t |",
             "|---|---|---:|---|---:|"]
    for a, b in comparisons:
        if a not in rows or b not in rows:
            continue
        other = {r["seed"]: r["scores"][split]["miou"] for r in rows[b]}
        pairs = [(r["seed"], r["scores"][split]["miou"] - other[r["seed"]])
                 for r in rows[a] if r["seed"] in other]
        diffs = [d for _, d in pairs]
        if not diffs:
            continue
        std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        t = (f"{statistics.mean(diffs) / (std / len(diffs) ** 0.5):.1f}"
             if len(diffs) > 1 and std > 0 else "-")
        lines.append(f"| {a} - {b} | {','.join(str(s) for s, _ in pairs)} | "
                     f"{mean_std(diffs)} | {' / '.join(f'{d:+.2f}' for d in diffs)} | {t} |")
    return "\n".join(lines)


def by_row(records: list[dict]) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for r in records:
        rows.setdefault(r["row"], []).append(r)
    return rows


def per_class_table(columns: dict[str, list[dict]], split: str = REAL) -> str:
    """Per-class IoU (%) on `split`, mean over each column's records (seeds)."""
    columns = {name: rs for name, rs in columns.items() if rs and split in rs[0]["scores"]}
    names = list(next(iter(columns.values()))[0]["scores"][split]["per_class"])
    lines = ["| class | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in names:
        cells = [statistics.mean(r["scores"][split]["per_class"][name] for r in rs)
                 for rs in columns.values()]
        lines.append(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def pseudo_table(reports: list[dict]) -> str:
    """Per-class threshold, precision and coverage of pseudo-labels: the mean over seeds of the
    `report.json` a pseudo-label sweep writes (one per seed)."""
    names = list(reports[0]["per_class"])
    lines = ["| class | threshold | precision % | coverage % |", "|---|---:|---:|---:|"]

    def mean(values, scale=1.0, digits=1):
        values = [v for v in values if v is not None]
        return f"{scale * statistics.mean(values):.{digits}f}" if values else "-"

    for i, name in enumerate(names):
        per_class = [r["per_class"][name] for r in reports]
        lines.append(f"| {name} | {mean([r['thresholds'][i] for r in reports], 1, 3)} "
                     f"| {mean([p['precision'] for p in per_class], 100)} "
                     f"| {mean([p['coverage'] for p in per_class], 100)} |")
    overall = [(r["precision"], r["coverage"]) for r in reports]
    lines.append(f"| all pixels | | {mean([p for p, _ in overall], 100)} "
                 f"| {mean([c for _, c in overall], 100)} |")
    return "\n".join(lines)


def provenance() -> str:
    """Commit, minicity version and machine, for the head of a results file: the commit when
    this process started, since a long benchmark keeps running the code it loaded then (HEAD
    may move on meanwhile); the date is the run's."""
    return f"{_STARTED_FROM}; {time.strftime('%Y-%m-%d')}"


def _code_at_start() -> str:
    from synseg_jax.data import minicity  # noqa: PLC0415
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (f"minicity {minicity.VERSION}; commit {commit}; {platform.machine()}, "
            f"{os.cpu_count()} CPUs")


_STARTED_FROM = _code_at_start()
