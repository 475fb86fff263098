"""The preprocessing stage: sources → cleaning with accounting → vocabularies, features, splits → Parquet.

``run_preprocess(config)`` reads the configured sources (``data.readers``) and writes the output layout
of ``data.schema`` (vocabularies, item features, train/validation/test sequences, the users' histories
for serving, quarantine, cold items) plus ``manifest.json`` (``data.manifest``), and returns the ``Manifest``.

How the work is spread: the readers give the interactions as Ray datasets whose read tasks parse the
files (``data.readers``); Ray tasks write them, a position in place of each row's source, as Parquet
files in the staging folder and pass back only the lines refused. Those files are hash-partitioned by
``user_id`` once, and every per-user step (duplicates, bot filter, the user side of the k-core,
histories and splits) then runs inside Ray workers on whole partitions with vectorised code. The
driver only ever sees small tables: per-block counts (about one row per user and per item), the
vocabularies, and a few numbers. Item text is tokenised by a pool of Ray actors, each loading the
tokenizer once.

Determinism: vocabularies are sorted by id, rows inside a shard are sorted by (user, time, source
position), and a shard is named after the smallest source position of its partition, so the same
input and config give byte-identical Parquet files (only ``created_at`` in the manifest differs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
import ray.data

from common import storage
from common.errors import InputError
from common.ray_connect import connect
from data import clean, splits
from data.config import CleanConfig, FeatureConfig, PreprocessConfig, RayDataConfig
from data.features import (
    ItemTextEncoder,
    RatingNormalisation,
    attribute_vocab,
    build_vocab,
    item_attributes,
    load_tokenizer,
    rating_normalisation,
    template_fields,
    tokenizer_path,
    user_rating_offsets,
)
from data.manifest import InputFile, Manifest, QuarantineCount, SplitSize, StepCount, TokenizerInfo
from data.readers import SourceTables, read_sources
from data.schema import (
    ATTRIBUTE_VOCAB,
    ATTRIBUTE_VOCAB_PATH,
    COLD_ITEMS,
    COLD_ITEMS_PATH,
    EVAL_SEQUENCE,
    INTERACTIONS,
    ITEM_VOCAB,
    ITEM_VOCAB_PATH,
    ITEMS_BASE,
    ITEMS_DIR,
    ITEMS_OUTPUT,
    MANIFEST_FILE,
    QUARANTINE,
    QUARANTINE_DIR,
    SCHEMA_VERSION,
    SEQUENCES_DIR,
    SPLITS,
    TRAIN_SEQUENCE,
    USER_HISTORIES,
    USER_HISTORIES_DIR,
    USER_VOCAB,
    USER_VOCAB_PATH,
)

ROWS_PER_INPUT_FILE = 250_000
INPUT_DIR = "_input"  # inside the staging folder, removed once the rows are partitioned
ROWS_PER_PARTITION = 500_000  # bounds the memory of one per-user task
ITEMS_PER_BLOCK = 16_384
ITEMS_PER_ACTOR = 100_000
PARTITION_STATS = pa.schema([("metric", pa.string()), ("count", pa.int64())])


# --- Entry points ---------------------------------------------------------------------------------


def run_preprocess(config: PreprocessConfig) -> Manifest:
    """Read the configured sources, preprocess them, write the output; see the module docstring."""
    _check_settings(config)
    _ensure_ray(config.ray)  # the readers' datasets need it
    return preprocess_tables(read_sources([config.source, *config.extra_sources]), config)


def preprocess_tables(sources: SourceTables, config: PreprocessConfig) -> Manifest:
    """Preprocess tables already in canonical form (what ``read_sources`` returns).

    ``sources`` is consumed: once its interactions are staged the driver's copy is released
    (``sources.interactions`` becomes an empty table), so the driver never holds both.
    """
    _check_settings(config)
    target = storage.resolve(config.output)
    rating = rating_normalisation(config.features, config.clean)
    tokenizer = _tokenizer_info(config)
    input_files, input_hash = _describe_inputs(sources)
    staging = storage.open_staging(target)
    try:
        _ensure_ray(config.ray)
        staged = _stage_interactions(sources, staging)
        with _data_context():
            result = _Run(sources, staged, config, rating, staging).execute()
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            config=config.model_dump(mode="json"),
            input_files=input_files,
            input_hash=input_hash,
            content_hash=_content_hash(input_hash, config),
            num_input_interactions=staged.count,
            rating=rating,
            tokenizer=tokenizer,
            **result,
        )
        storage.commit(staging, target, MANIFEST_FILE, manifest.model_dump_json(indent=2))
    except BaseException:
        storage.discard(staging)
        raise
    return manifest


def _check_settings(config: PreprocessConfig) -> None:
    template_fields(config.features.text_template)


@dataclass
class _Staged:
    """The interactions as Parquet files of ``clean``'s layout in the staging folder's INPUT_DIR."""

    count: int
    prefixes: pa.Array  # what precedes the number in the sources of each input part (``clean.sources_at``)
    quarantine: pa.Table  # QUARANTINE of every line the readers refused, the streamed files' first


STAGED = pa.schema([*(f for f in INTERACTIONS if f.name != "source"), pa.field(clean.POSITION, pa.int64(), nullable=False)])
REFUSED = pa.schema([(clean.POSITION, pa.int64()), ("reason", pa.string()), ("record", pa.string())])


def _stage_interactions(sources: SourceTables, staging: storage.Location) -> _Staged:
    """Stage every interaction of ``sources`` by Ray tasks, one input part after the other.

    The rows reach the shuffle as Parquet files rather than as blocks held by the driver: every node
    can read them, and Ray Data frees each block it read as soon as the shuffle has consumed it.
    """
    inputs = sources.interaction_inputs()
    sources.interactions = sources.interactions.schema.empty_table()
    prefixes: list[str] = []
    refused = [REFUSED.empty_table()]
    for streamed in inputs:
        try:
            refused.append(_gather(streamed.rows, _stage_block, REFUSED, first_part=len(prefixes), staging=staging))
        except InputError as err:
            # A reader's, raised in a read task: Ray wraps it in the task's traceback and appends its retry advice.
            raise InputError(str(getattr(err, "cause", err)).split("\n", 1)[0]) from None
        prefixes += streamed.prefixes
    input_dir = staging.join(INPUT_DIR)
    count = pads.dataset(input_dir, filesystem=staging.filesystem, format="parquet").count_rows() if storage.exists(staging, INPUT_DIR) else 0
    if count == 0:
        raise InputError(f"no interactions were read from {', '.join(sources.files) or 'the sources'}")
    rows = pa.concat_tables(refused).sort_by(clean.POSITION)
    prefix_array = pa.array(prefixes, pa.string())
    stage = pa.repeat(pa.scalar("read"), rows.num_rows)
    streamed_quarantine = pa.table([stage, rows["reason"], clean.sources_at(rows[clean.POSITION], prefix_array), rows["record"]], schema=QUARANTINE)
    return _Staged(count, prefix_array, pa.concat_tables([streamed_quarantine, sources.quarantine]))


def _stage_block(block: pa.Table, *, first_part: int, staging: storage.Location) -> pa.Table:
    """One block of READ_ROWS → its interactions as Parquet files named after their first position; returns the refused lines."""
    rows = block.append_column(clean.POSITION, clean.positions(pc.add(block["part"], first_part), block["number"]))
    refused = pc.is_valid(rows["reason"])
    interactions = rows.filter(pc.invert(refused)).select(STAGED.names).cast(STAGED)
    for start in range(0, interactions.num_rows, ROWS_PER_INPUT_FILE):
        part = interactions.slice(start, ROWS_PER_INPUT_FILE)
        storage.write_table(part, staging, f"{INPUT_DIR}/{part[clean.POSITION][0].as_py():020d}.parquet")
    return rows.filter(refused).select(REFUSED.names).cast(REFUSED)


def _tokenizer_info(config: PreprocessConfig) -> TokenizerInfo:
    path = tokenizer_path(config.features)
    tokenizer = load_tokenizer(path)
    return TokenizerInfo(
        path=path,
        class_name=type(tokenizer).__name__,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        max_text_tokens=config.features.max_text_tokens,
    )


def _describe_inputs(sources: SourceTables) -> tuple[list[InputFile], str]:
    """Size and sha256 of each input file, and one sha256 over all their bytes in path order.

    Tables handed over without files are hashed through their Arrow IPC serialisation instead.
    """
    combined = hashlib.sha256()
    described = []
    for path in sorted(set(sources.files)):
        digest, size = hashlib.sha256(), 0
        location = storage.resolve(path, "input file")
        with location.filesystem.open_input_stream(location.path, compression=None) as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
                combined.update(chunk)
                size += len(chunk)
        described.append(InputFile(path=path, size=size, sha256=digest.hexdigest()))
    if not described:
        for table in (sources.interactions, sources.items):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            combined.update(sink.getvalue())
    return described, combined.hexdigest()


def _content_hash(input_hash: str, config: PreprocessConfig) -> str:
    """Inputs plus every setting that shapes the data; where it is written, how Ray runs and where
    the input files lie (their bytes are hashed) do not count."""
    shaping = config.model_dump(mode="json", exclude={"output", "ray"})
    for source in [shaping["source"], *shaping["extra_sources"]]:
        for location_field in ("path", "items_path", "users_path"):
            source.pop(location_field)
    payload = json.dumps({"schema_version": SCHEMA_VERSION, "inputs": input_hash, "config": shaping}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _ensure_ray(config: RayDataConfig) -> None:
    # A local instance serves this one batch job: the dashboard and its module processes would
    # cost about 1 GB. To watch a run, start Ray with `ray start --head` and set ray.address.
    connect(config, include_dashboard=False)


@contextlib.contextmanager
def _data_context() -> Iterator[None]:
    """Ray Data settings the per-partition design relies on, restored afterwards.

    * A block must hold whole users, so map outputs are never split by size
      (``target_max_block_size=None``).
    * The shuffle's map side coalesces input blocks up to ``shuffle_input_batch_bytes`` (1 GiB by
      default) into one task, which would hash a whole input on one core; one task per input
      block keeps every core busy.
    """
    context = ray.data.DataContext.get_current()
    saved = context.target_max_block_size, context.shuffle_input_batch_bytes
    context.target_max_block_size, context.shuffle_input_batch_bytes = None, 0
    try:
        yield
    finally:
        context.target_max_block_size, context.shuffle_input_batch_bytes = saved


# --- Running blocks through Ray ---------------------------------------------------------------------


def _resolved_call(block: pa.Table, fn: Callable[..., pa.Table], **shared: ray.ObjectRef) -> pa.Table:
    result = fn(block, **{name: ray.get(ref) for name, ref in shared.items()})
    _release_freed_memory()
    return result


def _release_freed_memory() -> None:
    """Hand memory Arrow has freed back to the OS. Its allocator keeps freed pages for reuse, and
    an idle Ray worker allocates nothing that would trigger their return, so without this every
    worker that ever processed a partition would go on holding that partition's peak."""
    pa.default_memory_pool().release_unused()


def _map(ds: ray.data.Dataset, fn: Callable[..., pa.Table], **shared: Any) -> ray.data.Dataset:
    """``fn(block, **shared)`` on every whole block; shared values go through the object store once."""
    refs = {name: value if isinstance(value, ray.ObjectRef) else ray.put(value) for name, value in shared.items()}
    return ds.map_batches(_resolved_call, fn_args=(fn,), fn_kwargs=refs, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


def _gather(ds: ray.data.Dataset, fn: Callable[..., pa.Table], schema: pa.Schema, **shared: Any) -> pa.Table:
    """Run ``fn`` on every block and bring its (small) results, tables of ``schema``, to the driver."""
    results = list(_map(ds, fn, **shared).iter_batches(batch_format="pyarrow", batch_size=None))
    return pa.concat_tables(results) if results else schema.empty_table()


def _sum_by(table: pa.Table, keys: list[str]) -> pa.Table:
    summed = table.group_by(keys, use_threads=False).aggregate([("count", "sum")])
    return summed.rename_columns([*keys, "count"]).sort_by([(key, "ascending") for key in keys])


def _empty_step_message(step: str, config: CleanConfig) -> str:
    what = {
        "range": f"range check (value in [{config.min_value}, {config.max_value}], timestamp in [{config.min_timestamp}, {config.max_timestamp}])",
        "item_metadata": "item metadata check (require_item_metadata=true: no interaction's item_id is in the items table)",
        "duplicates": "duplicate removal",
        "bot_filter": f"bot filter (max_events_per_user_per_day={config.max_events_per_user_per_day})",
        "kcore": f"k-core (min_user_interactions={config.min_user_interactions}, min_item_interactions={config.min_item_interactions})",
    }[step]
    return f"{what} left no interactions"


class _Run:
    """One preprocessing run on a Ray cluster, writing into ``staging``."""

    def __init__(self, sources: SourceTables, staged: _Staged, config: PreprocessConfig, rating: RatingNormalisation, staging: storage.Location):
        self.staged = staged
        self.config = config
        self.rating = rating
        self.staging = staging
        self.items_table = _distinct_items(sources.items)
        self.num_input_interactions = staged.count

    def execute(self) -> dict[str, Any]:
        interactions, prefixes = self._partitioned_and_cleaned()
        interactions, kcore_iterations, converged, kept = self._kcore(interactions)
        steps, quarantine = self._accounting(interactions)
        users = build_vocab(kept.filter(pc.equal(kept["kind"], "user"))["key"], "user_id", "user_idx")
        items = build_vocab(kept.filter(pc.equal(kept["kind"], "item"))["key"], "item_id", "item_idx")
        cold = splits.choose_cold_items(items["item_id"].combine_chunks(), self.config.split.cold_item_fraction, self.config.split.seed)
        cutoffs = self._temporal_cutoffs(interactions, steps[-1].after)
        plan = splits.SplitPlan(self.config.split.strategy, cold, cutoffs)
        sums = (
            _gather(interactions, splits.training_rating_sums, splits.RATING_SUMS, plan=plan)
            if self.rating.kind == "user_center"
            else splits.RATING_SUMS.empty_table()
        )
        users = users.append_column("rating_offset", pa.array(user_rating_offsets(users["user_id"], sums, self.rating.kind)))
        split_sizes, cold_withheld = self._write_sequences(interactions, prefixes, plan, users, items)
        del interactions
        attributes = self._write_items(items, cold)
        self._write_small_tables(users, items, attributes, cold)
        return {
            "steps": steps,
            "kcore_iterations": kcore_iterations,
            "kcore_converged": converged,
            "quarantine": quarantine,
            "num_interactions": steps[-1].after,
            "num_users": users.num_rows,
            "num_items": items.num_rows,
            "num_attributes": attributes.num_rows,
            "num_cold_items": len(cold),
            "cold_withheld_interactions": cold_withheld,
            "temporal_cutoffs": list(cutoffs) if cutoffs else None,
            "splits": split_sizes,
        }

    # -- cleaning --

    def _partitioned_and_cleaned(self) -> tuple[ray.data.Dataset, ray.ObjectRef]:
        """Steps 1-4 on the staged rows, after one hash shuffle that puts each user's rows in one
        block; also returns the input parts' source prefixes, in the object store, for the rows that get dropped."""
        cpus = int(ray.cluster_resources().get("CPU", 1))
        partitions = self.config.ray.num_partitions or max(cpus, math.ceil(self.num_input_interactions / ROWS_PER_PARTITION))
        input_dir = self.staging.join(INPUT_DIR)
        ds = ray.data.read_parquet(input_dir, filesystem=self.staging.filesystem).repartition(partitions, keys=["user_id"])
        known_items = self.items_table["item_id"].combine_chunks() if self.config.clean.require_item_metadata else None
        cleaned = _map(ds, clean.clean_partition, config=self.config.clean, known_items=known_items).materialize()
        self.staging.filesystem.delete_dir(input_dir)
        return cleaned, ray.put(self.staged.prefixes)

    def _kcore(self, cleaned: ray.data.Dataset) -> tuple[ray.data.Dataset, int, bool, pa.Table]:
        """Iterate until every kept user and item meets its bound (or max_kcore_iterations passes).

        Each pass drops the rows of items below the bound, then, inside each partition, users
        left below theirs; item counts are then recounted globally from small per-block tables.
        The passes are not materialised one by one: each recount runs the passes so far again on
        the cleaned partitions (a vectorised filter each, cheaper than a copy of the data in the
        object store), and only the final result is materialised, once, for the steps after it.
        """
        config = self.config.clean
        ds, iterations = cleaned, 0
        while True:
            kept = _sum_by(_gather(ds, clean.count_kept, clean.KEPT_COUNTS), ["kind", "key"])
            item_counts = kept.filter(pc.equal(kept["kind"], "item"))
            user_counts = kept.filter(pc.equal(kept["kind"], "user"))
            sparse_items = item_counts.filter(pc.less(item_counts["count"], config.min_item_interactions))["key"]
            any_sparse_user = pc.any(pc.less(user_counts["count"], config.min_user_interactions)).as_py()
            converged = not len(sparse_items) and not any_sparse_user
            if converged or iterations == config.max_kcore_iterations:
                return (ds.materialize() if iterations else ds), iterations, converged, kept
            ds = _map(ds, clean.drop_sparse, sparse_items=sparse_items.combine_chunks(), config=config)
            iterations += 1

    def _accounting(self, ds: ray.data.Dataset) -> tuple[list[StepCount], list[QuarantineCount]]:
        """Before/after counts of each step from the drop markers; InputError at the step that empties the data."""
        dropped = _sum_by(_gather(ds, clean.count_dropped, clean.DROPPED_COUNTS), ["stage", "reason"])
        read_quarantine = self.staged.quarantine
        read = read_quarantine.select(["stage", "reason"]).append_column("count", pa.array([1] * read_quarantine.num_rows, pa.int64()))
        quarantine = [QuarantineCount(**row) for row in _sum_by(read, ["stage", "reason"]).to_pylist()]
        quarantine += [QuarantineCount(**row) for row in dropped.to_pylist()]
        steps, before = [], self.num_input_interactions
        for step in clean.STEPS:
            after = before - sum(q.count for q in quarantine if q.stage == clean.stage(step))
            steps.append(StepCount(step=step, before=before, after=after))
            if after == 0:
                raise InputError(_empty_step_message(step, self.config.clean))
            before = after
        return steps, quarantine

    # -- splits --

    def _temporal_cutoffs(self, ds: ray.data.Dataset, num_events: int) -> tuple[int, int] | None:
        if self.config.split.strategy != "temporal":
            return None
        ranks = splits.window_ranks(num_events, self.config.split)
        return splits.timestamps_at_ranks(
            ranks,
            _gather(ds, splits.day_counts, splits.DAY_COUNTS),
            lambda days: _gather(ds, splits.second_counts, splits.SECOND_COUNTS, days=days),
        )

    def _write_sequences(
        self, ds: ray.data.Dataset, prefixes: ray.ObjectRef, plan: splits.SplitPlan, users: pa.Table, items: pa.Table
    ) -> tuple[dict[str, SplitSize], int]:
        stats = _gather(
            ds,
            _write_partition,
            PARTITION_STATS,
            plan=plan,
            users=users,
            items=items.select(["item_id"]),
            features=self.config.features,
            rating=self.rating,
            staging=self.staging,
            prefixes=prefixes,
        )
        totals = {row["metric"]: row["count"] for row in _sum_by(stats, ["metric"]).to_pylist()}
        folders = [
            (f"{SEQUENCES_DIR}/train", "train_rows", TRAIN_SEQUENCE),
            (f"{SEQUENCES_DIR}/validation", "validation_rows", EVAL_SEQUENCE),
            (f"{SEQUENCES_DIR}/test", "test_rows", EVAL_SEQUENCE),
            (USER_HISTORIES_DIR, "user_history_rows", USER_HISTORIES),
        ]
        for folder, rows, schema in folders:
            if not totals.get(rows):  # keep every folder readable, even when empty
                storage.write_table(schema.empty_table(), self.staging, f"{folder}/empty.parquet")
        sizes = {
            name: SplitSize(
                rows=totals.get(f"{name}_rows", 0),
                interactions=totals.get("train_interactions" if name == "train" else f"{name}_rows", 0),
            )
            for name in SPLITS
        }
        return sizes, totals.get("cold_withheld", 0)

    # -- items and small tables --

    def _write_items(self, items: pa.Table, cold: pa.Array) -> pa.Table:
        """Item features for every vocabulary item, text tokenised by Ray actors; returns the attribute vocabulary."""
        rows = self.items_table.take(pc.index_in(items["item_id"], value_set=self.items_table["item_id"]))
        rows = rows.set_column(0, "item_id", items["item_id"])  # items without metadata: id only
        attributes = attribute_vocab(rows)
        features = pa.table(
            {
                "item_idx": items["item_idx"],
                "attributes": item_attributes(rows, attributes),
                "is_cold": pc.is_in(items["item_id"], value_set=cold),
                **{name: rows[name] for name in ITEMS_BASE.names},
            }
        )
        blocks = [features.slice(start, ITEMS_PER_BLOCK) for start in range(0, features.num_rows, ITEMS_PER_BLOCK)]
        cpus = int(ray.cluster_resources().get("CPU", 1))
        encoded = ray.data.from_arrow(blocks).map_batches(
            _ItemShardWriter,
            fn_constructor_kwargs={
                "tokenizer": tokenizer_path(self.config.features),
                "template": self.config.features.text_template,
                "max_tokens": self.config.features.max_text_tokens,
                "staging": self.staging,
            },
            # Each actor holds a tokenizer (~300 MB); one is plenty below ITEMS_PER_ACTOR items.
            compute=ray.data.ActorPoolStrategy(size=max(1, min(cpus, math.ceil(items.num_rows / ITEMS_PER_ACTOR)))),
            # No restarts: Ray Data hands an actor its UDF through the object store, and for such an actor with
            # restarts Ray's core writes an error line to the console (a restart needs that object to survive,
            # ray-project/ray#53727). This step takes seconds to minutes and writes to staging, and a rerun of
            # the preprocessing gives identical files, so a lost actor failing the run costs little.
            max_restarts=0,
            batch_format="pyarrow",
            batch_size=None,
        )
        written = sum(batch.num_rows for batch in encoded.iter_batches(batch_format="pyarrow", batch_size=None))
        assert written == items.num_rows, (written, items.num_rows)
        return attributes

    def _write_small_tables(self, users: pa.Table, items: pa.Table, attributes: pa.Table, cold: pa.Array) -> None:
        write = storage.write_table
        write(users.cast(USER_VOCAB), self.staging, USER_VOCAB_PATH)
        write(items.cast(ITEM_VOCAB), self.staging, ITEM_VOCAB_PATH)
        write(attributes.cast(ATTRIBUTE_VOCAB), self.staging, ATTRIBUTE_VOCAB_PATH)
        cold_rows = items.filter(pc.is_in(items["item_id"], value_set=cold))
        write(cold_rows.cast(COLD_ITEMS), self.staging, COLD_ITEMS_PATH)
        write(self.staged.quarantine.cast(QUARANTINE), self.staging, f"{QUARANTINE_DIR}/read.parquet")


def _distinct_items(items: pa.Table) -> pa.Table:
    """One row per item_id, the first one given (later sources may repeat items)."""
    numbered = items.append_column("_row", pa.array(range(items.num_rows), pa.int64()))
    firsts = numbered.group_by("item_id", use_threads=False).aggregate([("_row", "min")])["_row_min"]
    return items.take(pa.array(np.sort(firsts.to_numpy())))


def _write_partition(
    block: pa.Table,
    *,
    plan: splits.SplitPlan,
    users: pa.Table,
    items: pa.Table,
    features: FeatureConfig,
    rating: RatingNormalisation,
    staging: storage.Location,
    prefixes: pa.Array,
) -> pa.Table:
    """One user partition → its quarantine, sequence and user-history shards; returns row counts.

    The shards are written here rather than through ``Dataset.write_parquet`` because one pass
    produces four outputs, and because the shard name must follow from the partition's content
    (its smallest source position) for reruns to give identical files.
    """
    counts = {"quarantine_rows": 0, "train_rows": 0, "validation_rows": 0, "test_rows": 0, "user_history_rows": 0}
    counts |= {"train_interactions": 0, "cold_withheld": 0}
    if block.num_rows:
        name = f"part-{pc.min(block[clean.POSITION]).as_py():012d}.parquet"
        quarantine = clean.quarantine_records(block, prefixes)
        if quarantine.num_rows:
            storage.write_table(quarantine, staging, f"{QUARANTINE_DIR}/{name}")
        sequences = splits.build_sequences(block, plan=plan, users=users, items=items, features=features, rating=rating)
        for split, table in sequences.tables.items():
            if table.num_rows:
                storage.write_table(table, staging, f"{SEQUENCES_DIR}/{split}/{name}")
            counts[f"{split}_rows"] = table.num_rows
        if sequences.user_histories.num_rows:
            storage.write_table(sequences.user_histories, staging, f"{USER_HISTORIES_DIR}/{name}")
        counts |= {
            "quarantine_rows": quarantine.num_rows,
            "user_history_rows": sequences.user_histories.num_rows,
            "train_interactions": sequences.train_interactions,
            "cold_withheld": sequences.cold_withheld,
        }
    return pa.table({"metric": list(counts), "count": list(counts.values())}, schema=PARTITION_STATS)


class _ItemShardWriter(ItemTextEncoder):
    """Encodes a block of items and writes it as items/part-<first item_idx>.parquet."""

    def __init__(self, tokenizer: str, template: str, max_tokens: int, staging: storage.Location):
        super().__init__(tokenizer, template, max_tokens)
        self._staging = staging

    def __call__(self, items: pa.Table) -> pa.Table:
        encoded = super().__call__(items).select(ITEMS_OUTPUT.names).cast(ITEMS_OUTPUT)
        storage.write_table(encoded, self._staging, f"{ITEMS_DIR}/part-{encoded['item_idx'][0].as_py():09d}.parquet")
        result = pa.table({"item_idx": encoded["item_idx"]})
        _release_freed_memory()
        return result
