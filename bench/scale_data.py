"""Scale of the data stage: a synthetic set of ML-25M's shape through preprocessing, and training plus evaluation on
a subsample of its users.

Generates ratings.csv + movies.csv in the ml-latest layout (``preprocess_bench.generate``: Zipf-like item popularity
and user activity) with ML-25M's numbers (25M ratings, 162k users, 62k movies) into bench/_work/, runs
``polyrec preprocess`` on it, then ``polyrec train`` for one epoch (which evaluates the exported model on the test
split) on the preprocessing output of a subsample of the users (``--train-every 1``: on the full set, which takes
an hour or more on a 2-core machine). Each command runs as a child process; its wall time and the
peak memory of its whole process tree (Ray's raylet, object store and workers included) are measured. The results
go into their own section of bench/RESULTS.md.

    .venv/bin/python bench/scale_data.py                                  # 25M ratings, 1% of the users trained
    .venv/bin/python bench/scale_data.py --train-every 1                  # 25M ratings, every user trained
    .venv/bin/python bench/scale_data.py --rows 2000000 --no-write        # a quick look
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.preprocess_bench import MIN_VALUE, WORK, TreeMemory, generate  # noqa: E402
from bench.report import machine, publish  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Scale: preprocessing (bench/scale_data.py)"
POLYREC = str(REPO / ".venv" / "bin" / "polyrec")


def run_measured(name: str, command: list[str]) -> dict:
    """Run ``command``; its wall time and the peak RSS / PSS of its process tree."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    log = WORK / f"scale-{name}.log"
    print(f"{name}: {' '.join(command)} (log: {log})", flush=True)
    started = time.perf_counter()
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
        with TreeMemory(process.pid, interval=0.5) as memory:
            process.wait()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{name} failed (exit {process.returncode}); see {log}")
    result = {"wall_s": wall, "peak_rss": memory.peak_rss, "peak_pss": memory.peak_pss, "peak_driver_rss": memory.peak_root_rss}
    print(f"{name}: {result}", flush=True)
    return result


def preprocess(data: Path, out: Path, name: str) -> dict:
    config = WORK / f"scale-{name}-preprocess.yaml"
    config.write_text(f"source:\n  format: movielens-csv\n  path: {data}\nclean:\n  min_value: {MIN_VALUE}\n")
    shutil.rmtree(out, ignore_errors=True)
    return run_measured(f"preprocess-{name}", [POLYREC, "preprocess", "--config", str(config), "--output", str(out)])


def subsample_users(data: Path, folder: Path, every: int) -> int:
    """ratings.csv of the users whose id is a multiple of ``every``, the full movies.csv; returns the number of ratings."""
    ratings = pacsv.read_csv(data / "ratings.csv")
    kept = ratings.filter(pa.array(ratings["userId"].to_numpy() % every == 0))
    folder.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(kept, folder / "ratings.csv", pacsv.WriteOptions(quoting_style="none"))
    shutil.copy(data / "movies.csv", folder / "movies.csv")
    return kept.num_rows


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=25_000_000)
    parser.add_argument("--users", type=int, default=162_000)
    parser.add_argument("--items", type=int, default=62_000)
    parser.add_argument("--train-every", type=int, default=100, help="train on the users whose id is a multiple of this (1: all of them)")
    parser.add_argument("--no-write", action="store_true", help="print the section without writing RESULTS.md")
    args = parser.parse_args()

    data = WORK / f"ml25m-shape-{args.rows}"
    if not (data / "movies.csv").is_file():
        print(f"generating {args.rows:,} ratings of {args.users:,} users on {args.items:,} movies into {data}", flush=True)
        generate(args.rows, data, num_users=args.users, num_items=args.items)
    full = preprocess(data, WORK / "scale-out-full", "full")

    steps = [("preprocess (full set)", args.rows, full)]
    if args.train_every == 1:
        trained, train_rows, sample = WORK / "scale-out-full", args.rows, "full set"
    else:
        subsample = WORK / f"{data.name}-every-{args.train_every}"
        train_rows, trained, sample = subsample_users(data, subsample, args.train_every), WORK / "scale-out-subsample", "subsample"
        steps.append(("preprocess (subsample)", train_rows, preprocess(subsample, trained, "subsample")))
    train_config = WORK / "scale-train.yaml"
    train_config.write_text("epochs: 1\n")
    model = WORK / "scale-out-model"
    shutil.rmtree(model, ignore_errors=True)
    train = run_measured("train", [POLYREC, "train", "--config", str(train_config), "--data", str(trained), "--output", str(model)])
    steps.append((f"train 1 epoch + test evaluation + export ({sample})", train_rows, train))
    epoch_s = float(re.findall(r"epoch 1/1 total=.*?\(([\d.]+)s\)", (WORK / "scale-train.log").read_text())[-1])

    size = sum(f.stat().st_size for f in data.iterdir()) / 2**30
    trained_on = (
        "Training takes every user."
        if args.train_every == 1
        else f"An epoch over the full set takes hours on this 2-core machine (`--train-every 1`), so training takes the users whose id is "
        f"a multiple of {args.train_every}."
    )
    lines = [
        SECTION,
        "",
        f"Machine: {machine('ray', 'pyarrow', 'torch')}. Run {time.strftime('%Y-%m-%d', time.gmtime())}.",
        f"Synthetic ml-latest CSVs of ML-25M's shape ({args.rows:,} ratings, {args.users:,} users, {args.items:,} movies, Zipf-like;",
        f"{size:.2f} GiB of CSV), default settings but min_value 0.5. Each row is one `polyrec` command, wall time including",
        "Ray's start; memory is the peak over the command's whole process tree (RSS counts the shared object store once per",
        f"process mapping it, PSS splits it). {trained_on} The epoch, as the trainer reports it, took {epoch_s:.0f} s; it",
        f"includes encoding the text of every catalogue item once with the MiniLM backbone ({args.items:,} items).",
        "",
        "| step | input | wall | peak RSS (sum) | peak PSS (sum) | peak RSS of the driver |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for step, rows, result in steps:
        memory = " | ".join(_gib(result[key]) for key in ("peak_rss", "peak_pss", "peak_driver_rss"))
        lines.append(f"| {step} | {rows:,} ratings | {result['wall_s']:.0f} s | {memory} |")
    publish(SECTION, "\n".join(lines) + "\n", write=not args.no_write)


if __name__ == "__main__":
    main()
