"""Scale with the catalogue: training steps, ranking quality and the serving index against the number of items.

Four measurements, each in its own process (so that its peak memory is its own), results as JSON under
bench/_work/scale/ and a section of bench/RESULTS.md built from them:

* ``steps``: training steps of the default model (MiniLM text, frozen; id embeddings; every task) on a synthetic
  catalogue of N items with ml-100k's shape of interactions (943 users, 100k events, Zipf item popularity), with the
  full or the sampled softmax. The text cache is filled with random vectors instead of encoding N template texts
  (``encode`` measures that one-off cost), so a step costs what it costs after the cache. The trainer's optimizers
  in one process (no Ray Train / DeepSpeed around it): PyTorch AdamW, and for sparse tables the trainer's
  ``TableOptimizer``; the epoch time is the measured time per step times the steps in an epoch. ``paired`` runs the
  full and the sampled step alternating on the same batches, ``tables`` the sampled step with dense and with sparse
  tables.
* ``encode``: MiniLM's throughput on template item texts (the one-off text cache of a catalogue).
* ``quality``: `polyrec train` as a user runs it (Ray Train + DeepSpeed) on the real ml-100k, full against
  sampled softmax: epoch time and test NDCG@10.
* ``index``: the serving index (``serve.model_runtime.build_index``), exact against HNSW, on synthetic unit keys
  (clustered, as trained item vectors are): build time, query latency on one thread, recall of the exact top 10
  and top 200 (the candidates retrieval hands to ranking), size.

    .venv/bin/python bench/scale.py steps --items 100000 --loss sampled --steps 20
    .venv/bin/python bench/scale.py index --items 1000000
    .venv/bin/python bench/scale.py all --write       # everything, then the section of RESULTS.md
    .venv/bin/python bench/scale.py report --write    # the section from the JSON results already there
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.report import machine, publish  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "bench" / "_work" / "scale"
SECTION = "## Scale: catalogues (bench/scale.py)"
ML100K_USERS, ML100K_EVENTS, NUM_GENRES, TEXT_TOKENS = 943, 100_000, 19, 16


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def save(name: str, result: dict) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


# --- training steps on a synthetic catalogue ---------------------------------------------------


def synthetic_windows(num_items: int, seed: int = 0):
    """ml-100k-shaped histories (943 users, ~100k events, at least 20 each) over ``num_items`` Zipf-popular items,
    cut into training windows as the trainer cuts them."""
    import pyarrow as pa

    from train.windows import training_windows

    rng = np.random.default_rng(seed)
    lengths = np.maximum(20, rng.lognormal(math.log(70), 0.9, ML100K_USERS)).astype(int)
    lengths = np.maximum(20, (lengths * ML100K_EVENTS / lengths.sum()).astype(int))
    popularity = 1.0 / np.arange(1, num_items + 1)
    items = rng.choice(np.arange(1, num_items + 1), size=lengths.sum(), p=popularity / popularity.sum())
    rng.shuffle(items)  # the most popular item gets no fixed index
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    sequences = [items[start : start + length].tolist() for start, length in zip(starts, lengths)]
    rows = pa.table(
        {
            "user_idx": np.arange(1, ML100K_USERS + 1, dtype=np.int32),
            "history": [[] for _ in sequences],
            "history_ratings": [[] for _ in sequences],
            "items": sequences,
            "ratings": [rng.normal(size=len(s)).astype(np.float32).tolist() for s in sequences],
            "likes": [rng.integers(0, 2, len(s)).tolist() for s in sequences],
        }
    )
    return training_windows(rows, max_history=50, window_targets=25), int(lengths.sum())


def synthetic_catalog(num_items: int, seed: int = 0):
    import torch

    from train.model import CatalogFeatures

    generator = torch.Generator().manual_seed(seed)
    attributes = torch.zeros(num_items + 1, NUM_GENRES + 1)
    attributes[torch.arange(1, num_items + 1), torch.randint(1, NUM_GENRES + 1, (num_items,), generator=generator)] = 1.0
    tokens = torch.zeros(num_items + 1, TEXT_TOKENS, dtype=torch.long)  # the text cache is filled directly
    return CatalogFeatures(tokens, tokens.clone(), attributes, torch.zeros(num_items + 1, dtype=torch.bool))


def training_step(num_items: int, loss: str, sparse_tables: str | bool = "auto"):
    """(whether the loss is sampled, whether the tables are sparse, a function that trains one step on a batch and
    returns its seconds). The per-item and per-user tables are chosen as the trainer chooses them
    (``optimizer.sparse_tables``) and then trained by its ``TableOptimizer``, the rest by AdamW."""
    import torch

    from train.config import TrainConfig
    from train.model import PolyrecModel
    from train.trainer import TableOptimizer, TrainingModule, _parameter_groups, make_tables_sparse
    from train.weighting import LossWeighting

    torch.manual_seed(0)
    train_config = TrainConfig()
    train_config.optimizer.sparse_tables = sparse_tables
    config = train_config.model
    config.tasks.retrieval_loss = loss
    model = PolyrecModel(config, ML100K_USERS, num_items, NUM_GENRES, synthetic_catalog(num_items), rating_mean=0.0)
    model.item_encoder.text_embeddings.normal_()
    model.item_encoder.text_cache_ready = True
    weighting = LossWeighting(config.loss_weighting, model.task_names)
    tables = make_tables_sparse(model, train_config)
    optimizers = [torch.optim.AdamW(_parameter_groups(TrainingModule(model, weighting), train_config, tables))]
    if tables:
        optimizers.append(TableOptimizer(tables, train_config, num_train_windows=ML100K_EVENTS).optimizer)
    model.train()

    def step(batch: dict) -> float:
        started = time.perf_counter()
        total, _ = weighting(model.calculate_loss(batch), None)
        for optimizer in optimizers:
            optimizer.zero_grad()
        total.backward()
        for optimizer in optimizers:
            optimizer.step()
        return time.perf_counter() - started

    return model.sampled_retrieval, bool(tables), step


def synthetic_batches(windows, count: int, batch_size: int):
    from train.trainer import training_batch

    order = np.random.default_rng(0).permutation(windows.num_rows)
    for start in range(0, count * batch_size, batch_size):
        rows = windows.take(order[start : start + batch_size])
        yield training_batch({name: rows[name].to_numpy(zero_copy_only=False) for name in rows.column_names}, 50)


def run_paired(num_items: int, steps: int, batch_size: int = 32) -> dict:
    """Full and sampled steps alternating on the same batches in one process, so that load from other jobs on the
    machine falls on both alike: the ratio is the robust figure."""
    windows, _ = synthetic_windows(num_items)
    steps_by_loss = {loss: training_step(num_items, loss, sparse_tables=False)[2] for loss in ("full", "sampled")}
    times: dict[str, list[float]] = {loss: [] for loss in steps_by_loss}
    for batch in synthetic_batches(windows, steps + 2, batch_size):
        for loss, step in steps_by_loss.items():
            times[loss].append(step(batch))
    medians = {loss: float(np.median(values[2:])) for loss, values in times.items()}
    return {"items": num_items, "steps_timed": steps, **{f"{loss}_step_s": value for loss, value in medians.items()}}


def run_tables(num_items: int, steps: int, batch_size: int = 32) -> dict:
    """The sampled step with dense tables (one AdamW over everything) and with sparse ones (``TableOptimizer``),
    alternating on the same batches in one process."""
    windows, _ = synthetic_windows(num_items)
    steps_by_tables = {tables: training_step(num_items, "sampled", sparse_tables=setting)[2] for tables, setting in (("dense", False), ("sparse", True))}
    times: dict[str, list[float]] = {tables: [] for tables in steps_by_tables}
    for batch in synthetic_batches(windows, steps + 2, batch_size):
        for tables, step in steps_by_tables.items():
            times[tables].append(step(batch))
    return {"items": num_items, "steps_timed": steps, **{f"{tables}_step_s": float(np.median(values[2:])) for tables, values in times.items()}}


def run_steps(num_items: int, loss: str, steps: int, batch_size: int = 32) -> dict:
    windows, events = synthetic_windows(num_items)
    sampled, sparse, step = training_step(num_items, loss)
    times = [step(batch) for batch in synthetic_batches(windows, steps + 2, batch_size)][2:]  # two warm-up steps
    step_s = float(np.mean(times))
    steps_per_epoch = math.ceil(windows.num_rows / batch_size)
    return {
        "items": num_items,
        "loss": loss,
        "sampled": sampled,
        "sparse_tables": sparse,
        "events": events,
        "windows": windows.num_rows,
        "steps_timed": steps,
        "step_s": step_s,
        "epoch_s": step_s * steps_per_epoch,
        "peak_rss_gib": peak_rss_gib(),
    }


def run_encode(num_texts: int) -> dict:
    import torch

    from train.backbone import load_backbone, pool
    from train.config import BackboneConfig

    backbone, tokenizer = load_backbone(BackboneConfig())
    texts = [f"Movie {i} ({1950 + i % 70}). Genres: {['Drama', 'Comedy', 'Thriller'][i % 3]}|Romance. Tags: synthetic item {i}" for i in range(num_texts)]
    tokens = tokenizer(texts, max_length=64, truncation=True, padding=True, return_tensors="pt")
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, num_texts, 256):
            part = slice(start, start + 256)
            hidden = backbone(input_ids=tokens["input_ids"][part], attention_mask=tokens["attention_mask"][part]).last_hidden_state
            pool(hidden, tokens["attention_mask"][part], "mean")
    seconds = time.perf_counter() - started
    return {"texts": num_texts, "tokens": int(tokens["attention_mask"].sum(1).float().mean()), "items_per_s": num_texts / seconds}


# --- quality on ml-100k -------------------------------------------------------------------------


def run_quality(epochs: int) -> dict:
    import ray

    from data.config import PreprocessConfig
    from data.pipeline import run_preprocess
    from train.config import TrainConfig
    from train.trainer import run_training

    results = {}
    with tempfile.TemporaryDirectory(dir=WORK) as folder:
        data = str(Path(folder, "data"))
        preprocess = PreprocessConfig.from_yaml(REPO / "configs" / "preprocess.yaml").model_copy(update={"output": data})
        run_preprocess(preprocess)
        for loss in ("full", "sampled"):
            config = TrainConfig.from_yaml(REPO / "configs" / "train.yaml")
            config = config.model_copy(update={"data": data, "output": str(Path(folder, loss)), "epochs": epochs, "early_stopping_patience": epochs})
            config.model.tasks.retrieval_loss = loss
            result = run_training(config)
            seconds = [epoch["epoch_seconds"] for epoch in result.history]
            results[loss] = {
                "epochs": len(seconds),
                "epoch_s": float(np.median(seconds)),
                "test_ndcg10": result.test_metrics["polyrec"]["NDCG@10"],
                "test_hr10": result.test_metrics["polyrec"]["HR@10"],
                "best_validation_ndcg10": result.best_validation["validation/NDCG@10"],
            }
        ray.shutdown()
    return results


# --- the serving index --------------------------------------------------------------------------


def synthetic_keys(num_items: int, width: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit keys around ``num_items / 100`` random centres, and queries near random keys (scaled as retrieval
    queries are, by 1 / temperature)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, num_items // 100), width)).astype(np.float32)
    keys = centres[rng.integers(0, len(centres), num_items)] + 0.6 * rng.normal(size=(num_items, width)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    queries = keys[rng.integers(0, num_items, 500)] + 0.8 * rng.normal(size=(500, width)).astype(np.float32) / math.sqrt(width)
    return keys, 10.0 * queries / np.linalg.norm(queries, axis=1, keepdims=True)


def run_index(num_items: int, ef_searches: list[int]) -> dict:
    import faiss

    from serve.config import IndexConfig
    from serve.model_runtime import build_index

    keys, queries = synthetic_keys(num_items)
    ids = np.arange(1, num_items + 1)

    def timed_search(index: faiss.Index) -> tuple[np.ndarray, float]:
        faiss.omp_set_num_threads(1)  # as a serving replica (torch_threads: 1)
        started = time.perf_counter()
        found = np.stack([index.search(query[None], 200)[1][0] for query in queries])
        return found, 1000 * (time.perf_counter() - started) / len(queries)

    result = {"items": num_items}
    for kind in ("flat", "hnsw"):
        faiss.omp_set_num_threads(2)  # building may use the machine
        started = time.perf_counter()
        index = build_index(keys, ids, IndexConfig(kind=kind))
        row = {"build_s": time.perf_counter() - started, "bytes": len(faiss.serialize_index(index))}
        if kind == "flat":
            exact, row["query_ms"] = timed_search(index)
        else:
            row["by_ef_search"] = {}
            for ef_search in ef_searches:
                faiss.downcast_index(index.index).hnsw.efSearch = ef_search
                found, query_ms = timed_search(index)
                recall = {k: float(np.mean([len(np.intersect1d(e[:k], a[:k])) / k for e, a in zip(exact, found)])) for k in (10, 200)}
                row["by_ef_search"][ef_search] = {"query_ms": query_ms, "recall@10": recall[10], "recall@200": recall[200]}
        result[kind] = row
        del index
    return result


# --- orchestration and the report ---------------------------------------------------------------


def in_process(*args: str, timeout: float = 1800) -> None:
    """One measurement in a fresh process; a failure (out of memory) is recorded, not raised."""
    completed = subprocess.run([sys.executable, __file__, *args], cwd=REPO, timeout=timeout, capture_output=True, text=True)
    if completed.returncode:
        print(f"{' '.join(args)}: exit {completed.returncode}\n{completed.stderr[-2000:]}", file=sys.stderr)


#: The full softmax over 1M items is left out: its history mask alone is a [32, 50, 1M] int64 tensor (13 GB).
STEP_RUNS = [(1_682, "full"), (1_682, "sampled"), (5_000, "full"), (5_000, "sampled"), (20_000, "full"), (20_000, "sampled")]
STEP_RUNS += [(100_000, "full"), (100_000, "sampled"), (1_000_000, "auto")]
PAIRED_RUNS = [1_682, 5_000, 20_000]
TABLE_RUNS = [1_682, 100_000, 1_000_000]


def run_all(args: argparse.Namespace) -> None:
    for items, loss in STEP_RUNS:
        in_process("steps", "--items", str(items), "--loss", loss, "--steps", str(args.steps))
    for items in PAIRED_RUNS:
        in_process("paired", "--items", str(items))
    for items in TABLE_RUNS:
        in_process("tables", "--items", str(items))
    in_process("encode")
    for items in (100_000, 1_000_000):
        in_process("index", "--items", str(items))
    in_process("quality", "--epochs", str(args.epochs), timeout=3600)


def load(name: str) -> dict | None:
    path = WORK / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def step_findings() -> list[str]:
    """The full softmax's step against the sampled one at each size, and the sampled step's growth with the catalogue."""
    ratios = []
    for items in PAIRED_RUNS:
        paired = load(f"paired-{items}")
        if paired:
            full, sampled = paired["full_step_s"], paired["sampled_step_s"]
            ratios.append(f"{full:.3f} s against {sampled:.3f} s ({full / sampled:.1f}x) at {items:,} items")
    lines = []
    if ratios:
        lines.append(
            "The machine was shared with other jobs (load 2-5), which moves single runs by up to 2x; the full and the sampled step "
            f"alternating on the same batches in one process (`paired`, median of 10, tables dense in both) give the robust "
            f"comparison: {'; '.join(ratios)}."
        )
    tables = {items: load(f"tables-{items}") for items in TABLE_RUNS}
    if all(tables.values()):
        smallest, largest = tables[TABLE_RUNS[0]], tables[TABLE_RUNS[-1]]
        lines += [
            "",
            "The per-item and per-user tables (id embeddings, biases), dense (one AdamW over every parameter: each step zeroes, "
            "fills and updates every row) against sparse (`optimizer.sparse_tables`: sparse gradients and a row-wise "
            "`torch.optim.SparseAdam` for the rows a step touched), the sampled step alternating on the same batches in one "
            "process (`tables`, median of 10; these runs and the sampled rows above alone on the machine):",
            "",
            "| items | dense tables (s / step) | sparse tables (s / step) | dense / sparse |",
            "|---:|---:|---:|---:|",
        ]
        for items, run in tables.items():
            dense, sparse = run["dense_step_s"], run["sparse_step_s"]
            lines.append(f"| {items:,} | {dense:.3f} | {sparse:.3f} | {dense / sparse:.1f}x |")
        growth_dense = largest["dense_step_s"] / smallest["dense_step_s"]
        growth_sparse = largest["sparse_step_s"] / smallest["sparse_step_s"]
        lines += [
            "",
            f"From {TABLE_RUNS[0]:,} to {TABLE_RUNS[-1]:,} items ({TABLE_RUNS[-1] / TABLE_RUNS[0]:.0f}x the items, "
            f"{math.log(TABLE_RUNS[-1]) / math.log(TABLE_RUNS[0]):.1f}x their logarithm) the sampled step grows {growth_dense:.1f}x with "
            f"dense tables and {growth_sparse:.1f}x with sparse ones; `sparse_tables: auto` switches them on with the sampled softmax "
            "(ZeRO-0, fp32: CPU training).",
        ]
    return lines


def report() -> str:
    lines = [SECTION, "", f"Machine: {machine('torch', 'faiss')}. Each figure from one run of its command (the JSON under bench/_work/scale/).", ""]
    lines += [
        "Training steps on synthetic catalogues: ml-100k's shape of interactions (943 users, ~100k events, Zipf item",
        "popularity, ~4k training windows, batch 32) over N items; the default model (MiniLM text cache filled with random",
        "vectors: the one-off encoding is below; id embeddings; every task); the trainer's optimizers in one process (AdamW,",
        "and SparseAdam for the tables where `optimizer.sparse_tables: auto` makes them sparse: with the sampled softmax), two",
        "warm-up steps, then the mean of the timed steps times the steps of an epoch. Peak memory: the process's peak RSS.",
        "",
        "| items | retrieval loss | tables | steps timed | s / step | epoch (s) | peak RSS (GiB) |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for items, loss in STEP_RUNS:
        result = load(f"steps-{items}-{loss}")
        if result is None:
            lines.append(f"| {items:,} | {loss} | | | did not finish (out of memory or time) | | |")
            continue
        name = f"{loss} ({'sampled' if result['sampled'] else 'full'})" if loss == "auto" else loss
        tables = "sparse" if result.get("sparse_tables") else "dense"
        lines.append(
            f"| {items:,} | {name} | {tables} | {result['steps_timed']} | {result['step_s']:.3f} | {result['epoch_s']:.0f} | {result['peak_rss_gib']:.1f} |"
        )
    lines += ["", *step_findings()]
    encode = load("encode")
    if encode:
        lines += [
            "",
            f"Encoding item text with MiniLM (the frozen text cache, once per training run, kept in the artifact): "
            f"{encode['items_per_s']:.0f} items/s on template texts of {encode['tokens']} tokens, so "
            f"{100_000 / encode['items_per_s'] / 60:.0f} min for 100k items and {1_000_000 / encode['items_per_s'] / 60:.0f} min for 1M here.",
        ]
    quality = load("quality")
    if quality is None:
        lines += ["", "Full against sampled softmax on the real ml-100k (`bench/scale.py quality`): not measured yet."]
    else:
        lines += [
            "",
            "`polyrec train` (Ray Train + DeepSpeed, configs/train.yaml) on the real ml-100k, 1,682 items; "
            f"{quality['full']['epochs']} epochs each (the default is 30 with early stopping); epoch time: the median.",
            "",
            "| retrieval loss | epoch (s) | best validation NDCG@10 | test NDCG@10 | test HR@10 |",
            "|---|---:|---:|---:|---:|",
        ]
        for loss in ("full", "sampled"):
            row = quality[loss]
            lines.append(f"| {loss} | {row['epoch_s']:.1f} | {row['best_validation_ndcg10']:.4f} | {row['test_ndcg10']:.4f} | {row['test_hr10']:.4f} |")
        full, sampled = quality["full"], quality["sampled"]
        lines += [
            "",
            f"The sampled softmax's epoch (its tables sparse: `optimizer.sparse_tables: auto`) took {sampled['epoch_s'] / full['epoch_s']:.2f}x "
            f"the full one's here and its test NDCG@10 was {sampled['test_ndcg10'] / full['test_ndcg10']:.2f}x the full one's, one seed each: "
            "on a small catalogue sampling and the row-wise optimizer lose nothing measurable either. `retrieval_loss: auto` still "
            "trains the full softmax up to 5,000 items, the setting the quality benchmark's three seeds were measured with; these "
            "runs are too short and too few to move it.",
        ]
    lines += [
        "",
        "Serving index (`serve.model_runtime.build_index`) on synthetic 64-d unit keys around N/100 centres; 500 queries",
        "near random keys, one at a time on one thread (as a replica with `torch_threads: 1`), top 200 (the candidates",
        "handed to ranking); recall: the share of the exact top k the HNSW index returns. Builds on 2 threads.",
        "",
        "| items | index | build (s) | query (ms) | recall@10 | recall@200 | size (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for items in (100_000, 1_000_000):
        result = load(f"index-{items}")
        if result is None:
            continue
        flat, hnsw = result["flat"], result["hnsw"]
        lines.append(f"| {items:,} | flat (exact) | {flat['build_s']:.1f} | {flat['query_ms']:.2f} | 1 | 1 | {flat['bytes'] / 2**20:.0f} |")
        for ef_search, row in hnsw["by_ef_search"].items():
            lines.append(
                f"| {items:,} | HNSW, efSearch {ef_search} | {hnsw['build_s']:.1f} | {row['query_ms']:.2f} | {row['recall@10']:.3f} | "
                f"{row['recall@200']:.3f} | {hnsw['bytes'] / 2**20:.0f} |"
            )
    lines += [
        "",
        "Defaults read from these figures: `model.tasks.retrieval_loss: auto` trains the full softmax up to",
        "`full_softmax_max_items` (5,000) catalogue items and the sampled one above (the full step costs several times the",
        "sampled one from 5k items on); `retrieval.index.kind: auto` serves an exact index up to `exact_max_items` (200,000)",
        "and HNSW above (`hnsw_ef_search` 256). Evaluation ranks at most 2^24 score cells per batch",
        "(`train.evaluate.rows_per_batch`: 16 rows at 1M items), so its memory stays about 0.5 GB at any catalogue size.",
        "",
        "The full softmax over 1M items was not run: its history mask alone (`RetrievalTask.seen_before`) is a [32, 50, 1M]",
        "int64 tensor, 13 GB, beside [800, 1M] logits and the whole catalogue's vectors with gradients.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    steps = commands.add_parser("steps")
    steps.add_argument("--items", type=int, required=True)
    steps.add_argument("--loss", choices=["auto", "full", "sampled"], required=True)
    steps.add_argument("--steps", type=int, default=20)
    paired = commands.add_parser("paired")
    paired.add_argument("--items", type=int, required=True)
    paired.add_argument("--steps", type=int, default=10)
    table_steps = commands.add_parser("tables")
    table_steps.add_argument("--items", type=int, required=True)
    table_steps.add_argument("--steps", type=int, default=10)
    encode = commands.add_parser("encode")
    encode.add_argument("--texts", type=int, default=2048)
    quality = commands.add_parser("quality")
    quality.add_argument("--epochs", type=int, default=8)
    index = commands.add_parser("index")
    index.add_argument("--items", type=int, required=True)
    index.add_argument("--ef-search", type=int, nargs="+", default=[64, 128, 256])
    everything = commands.add_parser("all")
    everything.add_argument("--steps", type=int, default=20)
    everything.add_argument("--epochs", type=int, default=8)
    everything.add_argument("--write", action="store_true")
    written = commands.add_parser("report")
    written.add_argument("--write", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    if args.command == "steps":
        save(f"steps-{args.items}-{args.loss}", run_steps(args.items, args.loss, args.steps))
    elif args.command == "paired":
        save(f"paired-{args.items}", run_paired(args.items, args.steps))
    elif args.command == "tables":
        save(f"tables-{args.items}", run_tables(args.items, args.steps))
    elif args.command == "encode":
        save("encode", run_encode(args.texts))
    elif args.command == "quality":
        save("quality", run_quality(args.epochs))
    elif args.command == "index":
        save(f"index-{args.items}", run_index(args.items, args.ef_search))
    else:
        if args.command == "all":
            run_all(args)
        publish(SECTION, report(), write=args.write)


if __name__ == "__main__":
    main()
