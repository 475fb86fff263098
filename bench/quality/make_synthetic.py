"""A second quality set with a known generating model: the MovieLens-1M films (title, year, genres) as the
catalogue, users simulated with longer histories than ml-100k's, written as a ``table`` source.

ml-1m's ratings.dat is not available here (../shared/datasets/SOURCES.md), only its movies.dat, so the users are
simulated. The model, per user u (all draws from ``--seed``):

- taste θ_u ~ Dirichlet(0.5) over the 18 genres; preferred era μ_u ~ N(1990, 10) years; rating bias b_u ~ N(0, 0.4);
  history length 40 + LogNormal(ln 100, 0.5) items, at most ``--max-length`` (ml-100k: median 65, mean 106);
- a session genre m_t (the "mood"): drawn from θ_u at the start and with probability 0.15 at every later step,
  otherwise kept, so what comes next depends on what came just before;
- the next film is drawn without replacement with probability ∝ exp(s_ui(t)) over the films not yet seen, with
  s_ui(t) = 2.4 z_i + 5 [m_t ∈ genres_i] + 6 θ_u·ĝ_i − ((year_i − μ_u) / 12)², where z_i ~ N(0, 1) is the
  film's popularity and ĝ_i its genres as a distribution (the scale gives the oracle below an HR@10 of about a third:
  a set on which models can be told apart, neither saturated nor noise);
- its rating is round(3.2 + b_u(t) + 4 (θ_u·ĝ_i − mean_j θ_u·ĝ_j) + 0.3 z_i + ε), ε ~ N(0, 0.8), clipped to 1..5,
  where b_u(t) drifts as a random walk (steps N(0, 0.05)), so recent ratings say more than old ones;
- timestamps start uniformly in 2000-2002 and advance by Exp(1 day) + 1 s per step.

Text carries the genres and the year that drive the choices, ids carry popularity; neither alone is the whole model.
The oracle (the generating scores at each user's last step, whose film is the test target of a leave-one-out split,
the mood included, which no model observes) is an upper bound; its HR@10 and NDCG@10 go to ``oracle.json``.

    .venv/bin/python bench/quality/make_synthetic.py --movies ../shared/datasets/ml-1m/movies.dat

writes ``bench/quality/synthetic/{interactions,items}.parquet`` and ``oracle.json`` (committed: a few MB, so the
set needs ../shared only to be rebuilt); ``bench/quality/configs/synthetic-ml1m.yaml`` reads them.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path(__file__).resolve().parent / "synthetic"
TITLE_YEAR = re.compile(r"^(.*?) ?\((\d{4})\)\s*$")
START = 946_684_800  # 2000-01-01
DAY = 86_400


def read_movies(path: Path) -> tuple[list[str], list[str], np.ndarray, list[list[str]]]:
    """movies.dat (``MovieID::Title (Year)::Genre|Genre``, latin-1): ids, titles, years, genres."""
    ids, titles, years, genres = [], [], [], []
    for line_number, line in enumerate(path.read_text(encoding="latin-1").splitlines(), start=1):
        fields = line.split("::")
        match = TITLE_YEAR.match(fields[1]) if len(fields) == 3 else None
        if match is None:
            raise SystemExit(f"{path}:{line_number}: not 'MovieID::Title (Year)::Genres': {line!r}")
        ids.append(fields[0])
        titles.append(match.group(1))
        years.append(int(match.group(2)))
        genres.append(fields[2].split("|"))
    return ids, titles, np.array(years, dtype=np.float64), genres


def simulate(years: np.ndarray, genres: list[list[str]], num_users: int, max_length: int, seed: int) -> tuple[pa.Table, dict]:
    rng = np.random.default_rng(seed)
    names = sorted({genre for item in genres for genre in item})
    multi_hot = np.zeros((len(genres), len(names)))
    for row, item in enumerate(genres):
        multi_hot[row, [names.index(genre) for genre in item]] = 1
    genre_share = multi_hot / multi_hot.sum(axis=1, keepdims=True)
    popularity = rng.standard_normal(len(genres))
    columns: dict[str, list] = {"user_id": [], "item_id": [], "timestamp": [], "rating": []}
    oracle_ranks = []
    for user in range(num_users):
        taste = rng.dirichlet(np.full(len(names), 0.5))
        era, bias = rng.normal(1990, 10), rng.normal(0, 0.4)
        length = min(max_length, 40 + int(rng.lognormal(np.log(100), 0.5)))
        affinity = genre_share @ taste
        static = 2.4 * popularity + 6 * affinity - ((years - era) / 12) ** 2
        seen = np.zeros(len(genres), dtype=bool)
        mood = rng.choice(len(names), p=taste)
        time = START + int(rng.integers(0, 3 * 365 * DAY))
        for step in range(length):
            if step and rng.random() < 0.15:
                mood = rng.choice(len(names), p=taste)
            scores = np.where(seen, -np.inf, static + 5 * multi_hot[:, mood])
            probabilities = np.exp(scores - scores[~seen].max())
            item = rng.choice(len(genres), p=probabilities / probabilities.sum())
            if step == length - 1:  # the test target: its rank under the generating scores, ties against it
                oracle_ranks.append(1 + int(np.sum(scores[np.arange(len(genres)) != item] >= scores[item])))
            seen[item] = True
            bias += rng.normal(0, 0.05)
            rating = 3.2 + bias + 4 * (affinity[item] - affinity.mean()) + 0.3 * popularity[item] + rng.normal(0, 0.8)
            time += int(rng.exponential(DAY)) + 1
            columns["user_id"].append(f"u{user}")
            columns["item_id"].append(item)
            columns["timestamp"].append(time)
            columns["rating"].append(float(np.clip(np.round(rating), 1, 5)))
    ranks = np.array(oracle_ranks)
    hit = ranks <= 10
    oracle = {
        "users": num_users,
        "interactions": len(columns["item_id"]),
        "oracle_test_HR@10": float(hit.mean()),
        "oracle_test_NDCG@10": float(np.where(hit, 1 / np.log2(ranks + 1), 0).mean()),
        "seed": seed,
    }
    return pa.table(columns), oracle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--movies", type=Path, required=True, help="ml-1m movies.dat")
    parser.add_argument("--users", type=int, default=800)
    parser.add_argument("--max-length", type=int, default=400, help="longest simulated history")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    ids, titles, years, genres = read_movies(args.movies)
    interactions, oracle = simulate(years, genres, args.users, args.max_length, args.seed)
    interactions = interactions.set_column(1, "item_id", pa.array(np.array(ids)[interactions["item_id"].to_numpy()]))
    args.out.mkdir(parents=True, exist_ok=True)
    pq.write_table(interactions, args.out / "interactions.parquet")
    items = pa.table({"item_id": ids, "title": titles, "year": pa.array(years.astype(np.int32)), "genres": pa.array(genres, pa.list_(pa.string()))})
    pq.write_table(items, args.out / "items.parquet")
    (args.out / "oracle.json").write_text(json.dumps(oracle, indent=2) + "\n")
    lengths = np.bincount(np.unique(interactions["user_id"].to_numpy(zero_copy_only=False), return_inverse=True)[1])
    print(
        f"{oracle['interactions']:,} interactions of {args.users:,} users over {len(ids):,} films "
        f"(history median {np.median(lengths):.0f}, mean {lengths.mean():.0f}) in {args.out}"
    )
    print(json.dumps(oracle))


if __name__ == "__main__":
    main()
