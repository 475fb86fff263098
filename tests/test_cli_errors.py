"""Bad input on the command line is one line on stderr naming the file, field or flag at fault, exit status 2,
and nothing started: never a traceback."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import ray

from cluster.cli import main as polyrec
from common.errors import InputError
from data.readers.files import read_delimited, table_file_batches


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line ``polyrec argv`` printed, having exited 2 without starting Ray."""
    assert polyrec(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"polyrec {argv[0]}: error: ")
    assert not ray.is_initialized()
    return line


def test_a_config_file_that_is_not_text_or_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00epochs: 3")
    assert f"{tmp_path / 'binary.yaml'}: not UTF-8 text" in refused(["train", "--config", str(tmp_path / "binary.yaml")], capsys)
    assert f"{tmp_path}: a folder, not a config file" in refused(["train", "--config", str(tmp_path)], capsys)
    retrain = ["retrain", "--model", str(tmp_path), "--train-config", str(tmp_path / "binary.yaml")]
    assert f"{tmp_path / 'binary.yaml'}: not UTF-8 text" in refused(retrain, capsys)


def test_a_yaml_mistake_is_named_by_line_and_column_and_a_key_given_twice_is_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken.yaml").write_text("epochs: [1\n")
    line = refused(["train", "--config", str(tmp_path / "broken.yaml")], capsys)
    assert line.endswith(
        f"{tmp_path / 'broken.yaml'}: not valid YAML: line 2, column 1: while parsing a flow sequence, expected ',' or ']', but got '<stream end>'"
    )
    # YAML itself keeps the last of two values, silently: which one the user meant is theirs to say.
    (tmp_path / "twice.yaml").write_text("epochs: 3\nmodel:\n  user_model: {hidden_size: 32}\n  user_model: {num_heads: 4}\n")
    line = refused(["train", "--config", str(tmp_path / "twice.yaml")], capsys)
    assert line.endswith(f"{tmp_path / 'twice.yaml'}: not valid YAML: line 4, column 3: 'user_model' is given a second time")


def test_training_data_that_is_not_there_is_refused_before_ray_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(["train", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "model")], capsys)
    assert f"{tmp_path / 'data'}: manifest.json not found" in line


def test_a_file_where_a_folder_belongs(trained_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder\n")
    assert f"pretrain.output: {a_file} is a file" in refused(["pretrain", "--data", trained_run.data, "--output", str(a_file)], capsys)
    assert f"{a_file}: manifest.json cannot be read" in refused(["evaluate", "--model", trained_run.artifact, "--data", str(a_file)], capsys)


def test_a_manifest_that_is_not_one_is_named_with_its_missing_fields_in_one_line(trained_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "manifest.json").write_text('{"schema_version": 5}')
    line = refused(["evaluate", "--model", trained_run.artifact, "--data", str(tmp_path)], capsys)
    assert f"{tmp_path}/manifest.json: not a valid manifest: " in line and "num_items: Field required" in line
    assert "data: cannot open 'bogus://x'" in refused(["evaluate", "--model", trained_run.artifact, "--data", "bogus://x"], capsys)


@pytest.mark.parametrize(
    ("port", "problem"), [("-5", "greater than or equal to 1"), ("0", "greater than or equal to 1"), ("99999", "less than or equal to 65535")]
)
def test_a_port_off_the_tcp_range_is_refused_naming_the_port(trained_run, port: str, problem: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert f"serve: port: Input should be {problem}" in refused(["serve", "--model", trained_run.artifact, "--port", port], capsys)


@pytest.mark.parametrize("address", ["notaurl", "ftp://head:8265"])
@pytest.mark.parametrize("command", [["job", "status", "abc"], ["submit", "train"]])
def test_an_address_that_is_no_dashboard_url_is_named(address: str, command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert f"{address}: not a Ray dashboard address" in refused([*command, "--address", address], capsys)


@pytest.mark.parametrize("arguments", [["check", "k8s/base"], ["sync", "k8s/base"], ["build"]])
def test_k8s_actions_take_a_folder_only_to_build(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert "k8s build takes one kustomization folder" in refused(["k8s", *arguments], capsys)


def test_a_compressed_table_cut_short_is_named(tmp_path: Path) -> None:
    rows = gzip.compress(b"user_id,item_id,timestamp\n" + b"1,2,3\n" * 20_000)
    cut = tmp_path / "ratings.csv.gz"
    cut.write_bytes(rows[: len(rows) // 2])
    for read in (lambda: read_delimited(cut, {}), lambda: list(table_file_batches(cut))):
        with pytest.raises(InputError, match=f"^{cut}: cannot be read: "):
            read()
