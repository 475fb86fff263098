"""The manifest: what a preprocessing run read, did and wrote (``manifest.json`` beside the data), the contract
training, evaluation and serving read a preprocessing output by."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from common import storage
from common.config import validation_problems
from common.errors import InputError
from data.features import RatingNormalisation, rating_range_text
from data.schema import MANIFEST_FILE, SCHEMA_VERSION


class InputFile(BaseModel):
    path: str  # a local path or a URI
    size: int
    sha256: str


class StepCount(BaseModel):
    step: str
    before: int
    after: int

    @property
    def dropped(self) -> int:
        return self.before - self.after


class QuarantineCount(BaseModel):
    stage: str
    reason: str
    count: int


class SplitSize(BaseModel):
    rows: int
    interactions: int  # train: interactions in the training rows (none of a cold item); eval: one per row


class TokenizerInfo(BaseModel):
    path: str
    class_name: str
    vocab_size: int
    pad_token_id: int | None
    max_text_tokens: int


class Manifest(BaseModel):
    """What a preprocessing run read, did and wrote; saved as manifest.json beside the data."""

    schema_version: int
    created_at: str
    config: dict[str, Any]
    input_files: list[InputFile]
    input_hash: str  # sha256 over the input files' bytes, files in path order
    content_hash: str  # inputs + the settings that shape the data; what training records
    num_input_interactions: int
    steps: list[StepCount]  # the cleaning steps in order
    kcore_iterations: int  # k-core passes that dropped rows
    kcore_converged: bool
    quarantine: list[QuarantineCount]
    num_interactions: int
    num_users: int  # vocabulary sizes, without the padding index 0
    num_items: int
    num_attributes: int
    num_cold_items: int
    cold_withheld_interactions: int
    temporal_cutoffs: list[int] | None  # first second of validation and of test
    splits: dict[str, SplitSize]
    rating: RatingNormalisation
    tokenizer: TokenizerInfo


def load_manifest(uri: str) -> Manifest:
    location = storage.resolve(uri, "data")
    text = storage.read_text(location, MANIFEST_FILE)
    try:
        manifest = Manifest.model_validate_json(text)
    except ValidationError as err:
        raise InputError(f"{uri}/{MANIFEST_FILE}: not a valid manifest: {validation_problems(err)}") from None
    if manifest.schema_version != SCHEMA_VERSION:
        raise InputError(
            f"{uri}/{MANIFEST_FILE}: field schema_version is {manifest.schema_version}, this polyrec reads "
            f"{SCHEMA_VERSION}: run `polyrec preprocess` again to rewrite the data"
        )
    return manifest


def format_report(manifest: Manifest) -> str:
    lines = [
        f"{manifest.num_input_interactions:,} interactions read, {manifest.num_interactions:,} kept: "
        f"{manifest.num_users:,} users, {manifest.num_items:,} items, {manifest.num_attributes:,} attributes",
        "",
        f"{'step':<16}{'before':>12}{'after':>12}{'dropped':>12}",
    ]
    lines += [f"{s.step:<16}{s.before:>12,}{s.after:>12,}{s.dropped:>12,}" for s in manifest.steps]
    lines.append(
        f"k-core: {manifest.kcore_iterations} iteration(s), " + ("converged" if manifest.kcore_converged else "NOT converged (max_kcore_iterations reached)")
    )
    lines += ["", "quarantine:" if manifest.quarantine else "quarantine: empty"]
    lines += [f"  {q.count:>10,}  {q.stage:<20} {q.reason}" for q in manifest.quarantine]
    lines += ["", f"{'split':<16}{'rows':>12}{'interactions':>14}"]
    lines += [f"{name:<16}{size.rows:>12,}{size.interactions:>14,}" for name, size in manifest.splits.items()]
    if manifest.num_cold_items:
        lines.append(f"cold items: {manifest.num_cold_items:,} ({manifest.cold_withheld_interactions:,} training interactions withheld)")
    if manifest.temporal_cutoffs:
        lines.append(f"temporal cut points: {manifest.temporal_cutoffs[0]} (validation), {manifest.temporal_cutoffs[1]} (test)")
    lines += [
        f"ratings: {manifest.rating.kind} (shift {manifest.rating.shift:g}, scale {manifest.rating.scale:g}){_clipping(manifest.rating)}",
        f"tokenizer: {manifest.tokenizer.class_name} from {manifest.tokenizer.path}",
        f"content hash: {manifest.content_hash}",
    ]
    return "\n".join(lines)


def _clipping(rating: RatingNormalisation) -> str:
    if rating.low is None and rating.high is None:
        return ""
    return f", predictions clipped to {rating_range_text(rating.low, rating.high)}"
