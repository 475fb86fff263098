"""Preprocessing benchmark: polyrec (Ray Data) against a plain single-process pandas implementation.

Generates synthetic interactions in the ml-latest CSV layout (ratings.csv + movies.csv) with
long-tailed (Zipf-like) item popularity and user activity into bench/_work/, preprocesses them with
both implementations (tokenisation included), each in its own process, and reports wall time,
rows/s and the peak memory of the whole process tree (Ray's raylet, object store and workers
included), sampled from a thread. The two implementations must agree on every count, which makes
the pandas version an independent check of the pipeline. Results go into a section of
bench/RESULTS.md together with a description of the machine.

    .venv/bin/python bench/preprocess_bench.py --rows 1000000            # both implementations
    .venv/bin/python bench/preprocess_bench.py --rows 1000000 10000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import machine, write_section  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORK = BENCH_DIR / "_work"
SECTION = "## Preprocessing (bench/preprocess_bench.py)"

GENRES = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
MIN_VALUE = 0.5  # ml-latest ratings go in half stars from 0.5


# --- Synthetic ml-latest data ---------------------------------------------------------------------


def generate(rows: int, folder: Path, seed: int = 0, num_users: int | None = None, num_items: int | None = None) -> None:
    """ratings.csv (userId,movieId,rating,timestamp) and movies.csv (movieId,title,genres); by default the
    numbers of users and items grow with ``rows``."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    num_users, num_items = num_users or max(1_000, rows // 90), num_items or max(500, rows // 250)

    def zipf_ids(count: int, exponent: float) -> np.ndarray:
        weights = 1.0 / np.arange(1, count + 1) ** exponent
        ranked = rng.choice(count, size=rows, p=weights / weights.sum())
        return rng.permutation(count)[ranked] + 1  # ids unrelated to popularity

    users, items = zipf_ids(num_users, 0.9), zipf_ids(num_items, 1.0)
    stars = np.arange(1, 11) / 2
    star_share = np.array([1, 3, 2, 7, 5, 20, 13, 27, 8, 14], dtype=float)
    ratings = rng.choice(stars, size=rows, p=star_share / star_share.sum())
    timestamps = rng.integers(946_684_800, 1_577_836_800, size=rows)  # 2000-2020
    order = np.lexsort((items, users))  # ml-latest lists ratings by user, then movie
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"userId": users[order], "movieId": items[order], "rating": ratings[order], "timestamp": timestamps[order]})
    pacsv.write_csv(table, folder / "ratings.csv", pacsv.WriteOptions(quoting_style="none"))
    years = rng.integers(1920, 2020, size=num_items)
    genre_lists = [
        "|".join(sorted(rng.choice(GENRES, size=rng.integers(1, 4), replace=False))) if rng.random() > 0.02 else "(no genres listed)" for _ in range(num_items)
    ]
    movies = pa.table(
        {
            "movieId": np.arange(1, num_items + 1),
            "title": [f"Synthetic Movie {i}, Part {i % 7} ({year})" for i, year in enumerate(years, start=1)],
            "genres": genre_lists,
        }
    )
    pacsv.write_csv(movies, folder / "movies.csv")


# --- The two implementations (each runs in a child process) ------------------------------------


def run_polyrec(data: Path, out: Path) -> dict:
    from data.config import CleanConfig, PreprocessConfig, RayDataConfig, SourceConfig
    from data.pipeline import run_preprocess

    config = PreprocessConfig(
        source=SourceConfig(format="movielens-csv", path=str(data)),
        clean=CleanConfig(min_value=MIN_VALUE),
        ray=RayDataConfig(num_cpus=os.cpu_count()),
        output=str(out),
    )
    manifest = run_preprocess(config)
    return {
        "users": manifest.num_users,
        "items": manifest.num_items,
        "interactions": manifest.num_interactions,
        "quarantined": sum(q.count for q in manifest.quarantine),
        "train_interactions": manifest.splits["train"].interactions,
        "validation_rows": manifest.splits["validation"].rows,
        "test_rows": manifest.splits["test"].rows,
    }


def run_ml100k(out: Path) -> dict:
    """The embedded MovieLens-100K with the default configuration, as `polyrec preprocess` runs it."""
    from data.config import PreprocessConfig
    from data.pipeline import run_preprocess

    manifest = run_preprocess(PreprocessConfig(output=str(out)))
    return {"users": manifest.num_users, "items": manifest.num_items, "interactions": manifest.num_interactions}


def run_pandas(data: Path, out: Path) -> dict:
    """The same steps with the default settings, written the way one would in plain pandas."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from data.config import CleanConfig, FeatureConfig
    from data.features import tokenizer_path

    clean, features = CleanConfig(min_value=MIN_VALUE), FeatureConfig()
    ratings = pd.read_csv(data / "ratings.csv", dtype={"userId": str, "movieId": str})
    movies = pd.read_csv(data / "movies.csv", dtype={"movieId": str})
    df = pd.DataFrame(
        {
            "user_id": ratings["userId"],
            "item_id": ratings["movieId"],
            "timestamp": ratings["timestamp"].astype("int64"),
            "event": "rate",
            "value": ratings["rating"].astype("float64"),
            "position": np.arange(len(ratings)),
        }
    )
    df["source"] = "ratings.csv:" + (df["position"] + 2).astype(str)
    del ratings
    quarantined = []

    def drop(mask: pd.Series, stage: str, reason: str) -> None:
        nonlocal df
        if mask.any():
            quarantined.append(df[mask].assign(stage=stage, reason=reason))
            df = df[~mask]

    drop((df["value"] < clean.min_value) | (df["value"] > clean.max_value), "clean:range", "value outside")
    drop((df["timestamp"] < clean.min_timestamp) | (df["timestamp"] > clean.max_timestamp), "clean:range", "timestamp")
    drop(~df["item_id"].isin(movies["movieId"]), "clean:item_metadata", "item has no metadata")
    drop(df.duplicated(subset=["user_id", "item_id", "timestamp", "event", "value"]), "clean:duplicates", "duplicate")
    while True:
        before = len(df)
        drop(df["item_id"].map(df["item_id"].value_counts()) < clean.min_item_interactions, "clean:kcore", "item")
        drop(df["user_id"].map(df["user_id"].value_counts()) < clean.min_user_interactions, "clean:kcore", "user")
        if len(df) == before:
            break
    out.mkdir(parents=True, exist_ok=True)
    if quarantined:
        dropped = pd.concat(quarantined)
        records = dropped[["user_id", "item_id", "timestamp", "event", "value", "source"]].to_json(orient="records", lines=True)
        dropped.assign(record=records.splitlines())[["stage", "reason", "source", "record"]].to_parquet(out / "quarantine.parquet")

    users = np.sort(df["user_id"].unique())
    items = np.sort(df["item_id"].unique())
    df["user_idx"] = np.searchsorted(users, df["user_id"]).astype("int32") + 1
    df["item_idx"] = np.searchsorted(items, df["item_id"]).astype("int32") + 1
    df["like"] = np.where(df["value"].isna(), -1, df["value"] >= features.like_threshold).astype("int8")
    pd.DataFrame({"user_id": users, "user_idx": np.arange(1, len(users) + 1)}).to_parquet(out / "users.parquet")

    movies = movies[movies["movieId"].isin(items)].set_index("movieId").loc[items]
    parts = movies["title"].str.extract(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")
    genres = movies["genres"].replace("(no genres listed)", "").str.split("|")
    texts = [
        f"{title}. Year: {year}. Genres: {', '.join(g for g in genre if g)}." if any(genre) else f"{title}. Year: {year}."
        for title, year, genre in zip(parts["title"], parts["year"], genres)
    ]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path(features))
    input_ids = tokenizer(texts, truncation=True, max_length=features.max_text_tokens)["input_ids"]
    pq.write_table(
        pa.table(
            {"item_idx": np.arange(1, len(items) + 1, dtype=np.int32), "item_id": items, "text": texts, "input_ids": pa.array(input_ids, pa.list_(pa.int32()))}
        ),
        out / "items.parquet",
    )

    df = df.sort_values(["user_id", "timestamp", "position"])
    df["from_end"] = df.groupby("user_id").cumcount(ascending=False)
    eligible = df["user_id"].map(df["user_id"].value_counts()) >= 3
    train = df[~eligible | (df["from_end"] >= 2)]
    chunk = train.groupby("user_id").cumcount(ascending=False) // (features.max_history + 1)
    sequences = train.groupby(["user_idx", chunk.rename("chunk")])[["item_idx", "value", "like", "timestamp"]].agg(list)
    sequences.reset_index().to_parquet(out / "train.parquet")
    full = df.groupby("user_idx")["item_idx"].agg(list)
    for name, from_end in (("validation", 1), ("test", 0)):
        targets = df[eligible & (df["from_end"] == from_end)]
        seen = [full[u][: len(full[u]) - 1 - from_end] for u in targets["user_idx"]]
        pd.DataFrame(
            {
                "user_idx": targets["user_idx"].to_numpy(),
                "history": [s[-features.max_history :] for s in seen],
                "seen_items": seen,
                "target_item": targets["item_idx"].to_numpy(),
                "target_rating": targets["value"].to_numpy(),
                "target_like": targets["like"].to_numpy(),
                "target_timestamp": targets["timestamp"].to_numpy(),
            }
        ).to_parquet(out / f"{name}.parquet")
    return {
        "users": len(users),
        "items": len(items),
        "interactions": len(df),
        "quarantined": sum(len(q) for q in quarantined),
        "train_interactions": len(train),
        "validation_rows": int((eligible & (df["from_end"] == 1)).sum()),
        "test_rows": int((eligible & (df["from_end"] == 0)).sum()),
    }


# --- Measuring ------------------------------------------------------------------------------------


class TreeMemory:
    """Peak memory of a process and all its descendants, sampled every ``interval`` seconds.

    ``rss`` sums resident sets (shared pages, e.g. the Ray object store mapped into several
    workers, count once per process); ``pss`` shares each page among the processes that map it,
    so it does not double count. ``peak_root_rss`` is the process's own (the driver's, for a Ray job).
    """

    def __init__(self, pid: int, interval: float = 0.25):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = self.peak_pss = self.peak_root_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for process in processes:
                try:
                    info = process.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
                    if process is self.root:
                        self.peak_root_rss = max(self.peak_root_rss, info.rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._stop.wait(self.interval)


def measure(implementation: str, data: Path | None = None) -> dict:
    """Run one implementation in a child process; wall time, peak tree memory, and the machine's
    load average around it (this box may be shared, which slows a run down)."""
    label = f"{implementation}-{data.name if data else 'embedded'}"
    out, result_file = WORK / f"out-{label}", WORK / f"result-{label}.json"
    command = [sys.executable, __file__, "--child", implementation, "--out", str(out), "--result", str(result_file)]
    command += ["--data", str(data)] if data else []
    load_before = os.getloadavg()[0]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with TreeMemory(process.pid) as memory:
        _, stderr = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{label} failed:\n{stderr[-4000:]}")
    load = (load_before, os.getloadavg()[0])
    return {"wall_s": wall, "peak_rss": memory.peak_rss, "peak_pss": memory.peak_pss, "load": load, **json.loads(result_file.read_text())}


# --- Reporting ------------------------------------------------------------------------------------


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def report(rows: list[tuple[int, dict, dict | None]], ml100k: dict) -> str:
    lines = [
        SECTION,
        "",
        f"Machine: {machine('ray', 'pyarrow', 'pandas', 'transformers')}. Run {time.strftime('%Y-%m-%d', time.gmtime())}.",
        "Synthetic ml-latest CSVs (Zipf-like users and items); default settings (leave-one-out, k-core 3,",
        "min_value 0.5), item text tokenised with the packaged MiniLM tokenizer. Wall time includes reading",
        "the CSVs, starting Ray and writing Parquet. Memory: peak over the whole process tree; RSS counts",
        "shared pages (the Ray object store) once per process that maps them, PSS splits them. The",
        "machine is shared with other jobs: the load column is the 1-minute load average before → after.",
        "",
        "| rows | implementation | wall | rows/s | peak RSS (sum) | peak PSS (sum) | polyrec / pandas time | load |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for count, polyrec, pandas in rows:
        ratio = f"{polyrec['wall_s'] / pandas['wall_s']:.2f}×" if pandas else ""
        for name, result in (("polyrec (Ray Data)", polyrec), ("pandas, one process", pandas)):
            if result:
                lines.append(
                    f"| {count:,} | {name} | {result['wall_s']:.1f} s | {count / result['wall_s']:,.0f} | "
                    f"{_gib(result['peak_rss'])} | {_gib(result['peak_pss'])} | {ratio if name.startswith('polyrec') else ''} | "
                    f"{_load(result)} |"
                )
    lines += [
        "",
        f"The embedded MovieLens-100K with the default configuration (`polyrec preprocess`): {ml100k['wall_s']:.1f} s "
        f"wall for the whole process (Ray start included), peak RSS {_gib(ml100k['peak_rss'])}, load {_load(ml100k)}.",
    ]
    return "\n".join(lines) + "\n"


def _load(result: dict) -> str:
    return f"{result['load'][0]:.1f} → {result['load'][1]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--skip-pandas", action="store_true")
    parser.add_argument("--child", choices=["polyrec", "pandas", "ml100k"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = {"polyrec": run_polyrec, "pandas": run_pandas, "ml100k": lambda _, out: run_ml100k(out)}[args.child]
        args.result.write_text(json.dumps(run(args.data, args.out)))
        return

    ml100k = measure("ml100k")
    print(f"ml-100k, polyrec: {ml100k}", flush=True)
    results = []
    for count in args.rows:
        data = WORK / f"ml-synthetic-{count}"
        if not (data / "movies.csv").is_file():
            print(f"generating {count:,} ratings into {data}", flush=True)
            generate(count, data)
        polyrec = measure("polyrec", data)
        print(f"{count:,} rows, polyrec: {polyrec}", flush=True)
        pandas = None if args.skip_pandas else measure("pandas", data)
        if pandas:
            print(f"{count:,} rows, pandas:  {pandas}", flush=True)
            counts = [k for k in polyrec if k not in ("wall_s", "peak_rss", "peak_pss", "load")]
            mismatched = {k: (polyrec[k], pandas[k]) for k in counts if polyrec[k] != pandas[k]}
            if mismatched:
                raise SystemExit(f"polyrec and pandas disagree on {count:,} rows: {mismatched}")
        results.append((count, polyrec, pandas))
    section = report(results, ml100k)
    write_section(SECTION, section)
    print(section)


if __name__ == "__main__":
    main()
