"""Remote storage end to end: every stage reads and writes ``s3://`` against moto's S3 server (from PyPI, started
here on a free port), driven through the ``polyrec`` CLI as a user runs it: preprocess into the bucket, train from
it into the bucket, serve the artifact from the bucket with the feedback log in the bucket, and retrain from that
log. What landed in the bucket is checked with boto3, a client independent of the pyarrow filesystems the stages use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
from moto.server import ThreadedMotoServer
from ray import serve

import train.artifact as artifact_module
from cluster.cli import main as polyrec
from common.errors import InputError
from data.manifest import load_manifest
from serve.config import ServeConfig
from serve.runner import APP_NAME
from tests.ports import free_port
from tests.tiny import tiny_config, tiny_preprocess_config
from train.artifact import METADATA_FILE, read_metadata

pytestmark = pytest.mark.slow

BUCKET = "polyrec-test"
API_KEY = "s3-key"
CLICKED = ["181", "174", "172", "50", "100"]


@dataclass
class S3Run:
    bucket: object  # boto3's Bucket
    data: str
    model: str
    feedback: str
    served: dict  # GET /v1/model while serving the artifact from the bucket
    recommended: dict  # POST /v1/recommend for the user who clicked
    user: str
    retrain_dir: Path


def keys(bucket, prefix: str) -> list[str]:
    return sorted(obj.key for obj in bucket.objects.filter(Prefix=prefix))


def parquet_object(bucket, key: str) -> pa.Table:
    return pq.read_table(pa.BufferReader(bucket.Object(key).get()["Body"].read()))


@pytest.fixture(scope="module")
def s3_run(tmp_path_factory) -> S3Run:
    root = tmp_path_factory.mktemp("s3")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # Set before Ray starts, so that its workers and Serve's replicas inherit them: pyarrow's S3 filesystem reads
    # the endpoint and the credentials from the environment, as it would a real deployment's.
    environment = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "POLYREC_API_KEY": API_KEY,
    }
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    bucket = boto3.resource("s3").Bucket(BUCKET)
    bucket.create()
    data, model, feedback = f"s3://{BUCKET}/data", f"s3://{BUCKET}/model", f"s3://{BUCKET}/feedback"
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        preprocess_config = tiny_preprocess_config(root)
        (root / "preprocess.yaml").write_text(preprocess_config.to_yaml())
        assert polyrec(["preprocess", "--config", str(root / "preprocess.yaml"), "--output", data]) == 0

        (root / "train.yaml").write_text(tiny_config(data, model, epochs=1).to_yaml())
        assert polyrec(["train", "--config", str(root / "train.yaml")]) == 0

        serve_config = ServeConfig(state_dir=str(root / "serve"), port=free_port())
        (root / "serve.yaml").write_text(serve_config.to_yaml())
        artifact = f"{model}/artifact"
        assert polyrec(["serve", "--config", str(root / "serve.yaml"), "--model", artifact, "--feedback-log", feedback, "--detach"]) == 0
        url = f"http://127.0.0.1:{serve_config.port}"
        user = parquet_object(bucket, "data/vocab/users.parquet").column("user_id")[0].as_py()
        served = httpx.get(f"{url}/v1/model", timeout=60).json()
        recommended = httpx.post(f"{url}/v1/recommend", json={"user_id": user, "k": 5}, timeout=60).json()
        events = {"events": [{"user_id": user, "item_id": item, "event": "click"} for item in CLICKED]}
        response = httpx.post(f"{url}/v1/feedback", headers={"X-API-Key": API_KEY}, json=events, timeout=60)
        assert response.status_code == 200, response.text

        # Retraining warm-starts from the version in service (the artifact in the bucket), trained by the same training
        # config, and swaps the new one in.
        (root / "retrain.yaml").write_text(json.dumps({"preprocess": preprocess_config.model_dump(mode="json")}))  # JSON is YAML
        retrain_dir = root / "retrain"
        retrain = ["retrain", "--config", str(root / "retrain.yaml"), "--train-config", str(root / "train.yaml"), "--feedback-log", feedback]
        assert polyrec([*retrain, "--output", str(retrain_dir)]) == 0
        yield S3Run(bucket, data, model, feedback, served, recommended, user, retrain_dir)
    finally:
        if ray.is_initialized():
            if APP_NAME in serve.status().applications:
                serve.shutdown()
            ray.shutdown()
        server.stop()
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def test_preprocess_writes_its_output_into_the_bucket(s3_run):
    written = keys(s3_run.bucket, "data/")
    assert "data/manifest.json" in written
    assert any(key.startswith("data/sequences/train/part-") for key in written)
    assert not keys(s3_run.bucket, ".data.staging"), "the staging folder is removed once committed"
    manifest = json.loads(s3_run.bucket.Object("data/manifest.json").get()["Body"].read())
    users = parquet_object(s3_run.bucket, "data/vocab/users.parquet")
    assert manifest["num_users"] == users.num_rows == 40
    assert load_manifest(s3_run.data).content_hash == manifest["content_hash"]


def test_train_exports_the_artifact_and_checkpoints_into_the_bucket(s3_run):
    written = keys(s3_run.bucket, "model/")
    for name in ("artifact.json", "model.safetensors", "item_vectors.safetensors", "items.parquet", "users.parquet"):
        assert f"model/artifact/{name}" in written
    assert "model/metrics.json" in written and "model/training_curves.png" in written
    assert any(key.startswith("model/ray_results/") and key.endswith("/model.safetensors") for key in written), written
    metadata = json.loads(s3_run.bucket.Object(f"model/artifact/{METADATA_FILE}").get()["Body"].read())
    assert metadata["training_data"] == s3_run.data


def test_serving_loads_the_artifact_from_the_bucket(s3_run):
    metadata = json.loads(s3_run.bucket.Object(f"model/artifact/{METADATA_FILE}").get()["Body"].read())
    assert s3_run.served["model_version"] == metadata["model_version"]
    assert len(s3_run.recommended["items"]) == 5


def test_retrain_reads_the_feedback_log_in_the_bucket(s3_run):
    parts = [key for key in keys(s3_run.bucket, "feedback/") if not key.endswith("/")]  # "feedback/": the folder's marker
    assert parts and all(key.endswith(".parquet") for key in parts), parts
    logged = pa.concat_tables([parquet_object(s3_run.bucket, key) for key in parts])
    clicks = logged.filter(pc.equal(logged["event"], "click"))
    assert sorted(clicks["item_id"].to_pylist()) == sorted(CLICKED)

    outcome = json.loads(next(s3_run.retrain_dir.glob("*/retrain.json")).read_text())
    new_data = next(s3_run.retrain_dir.glob("*/data"))
    assert load_manifest(str(new_data)).num_input_interactions == load_manifest(s3_run.data).num_input_interactions + len(CLICKED)
    assert outcome["current_model"] == f"{s3_run.model}/artifact"  # the warm start and the gate's reference
    assert outcome["swapped"] == outcome["promoted"]  # into the service that runs the artifact from the bucket


def test_an_artifacts_metadata_is_read_from_the_bucket_without_copying_the_artifact(s3_run, tmp_path, monkeypatch):
    monkeypatch.setattr(artifact_module, "ARTIFACT_CACHE", tmp_path / "cache")
    expected = json.loads(s3_run.bucket.Object(f"model/artifact/{METADATA_FILE}").get()["Body"].read())
    assert read_metadata(f"{s3_run.model}/artifact") == expected
    assert not (tmp_path / "cache").exists()  # the copy serving makes (local_artifact) is not made to read one file
    with pytest.raises(InputError, match=rf"^{s3_run.model}: no model artifact there .*, whose artifact is {s3_run.model}/artifact$"):
        read_metadata(s3_run.model)
