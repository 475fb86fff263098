"""The quality benchmark's own logic (bench/quality): variants given as overrides, the seeds' summary, the defaults'
rules, and the synthetic set's generator. The benchmark's trainings themselves are too long for the suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.quality.make_synthetic import main as make_synthetic
from bench.quality.run import default_rules, parse_variant, peer_is_kept, summary, train_config
from common.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def test_a_variant_is_train_config_overrides_by_dotted_key():
    name, overrides = parse_variant("lora=model.backbone.mode=lora,model.backbone.lora_target_modules=[query, value],epochs=3")
    assert name == "lora"
    assert overrides == {"model": {"backbone": {"mode": "lora", "lora_target_modules": ["query", "value"]}}, "epochs": 3}
    config = train_config(overrides, name, seed=2, data_dir=Path("/d"), max_epochs=None)
    assert (config.model.backbone.mode, config.model.backbone.lora_target_modules, config.epochs, config.seed) == ("lora", ["query", "value"], 3, 2)
    assert config.model.backbone.pooling == "mean"  # a sibling key keeps its default


def test_the_built_in_id_only_variant_is_the_trainers_ablation():
    name, overrides = parse_variant("id-only")
    config = train_config(overrides, name, seed=0, data_dir=Path("/d"), max_epochs=1)
    assert (config.model.item_encoder.use_text, config.model.item_encoder.id_dropout, config.epochs) == (False, 0.0, 1)


@pytest.mark.parametrize("text", ["x", "bad name=epochs=1", "v=epochs", "v=model.nope=1"])
def test_a_wrong_variant_is_an_input_error(text):
    with pytest.raises(InputError):
        name, overrides = parse_variant(text)
        train_config(overrides, name, seed=0, data_dir=Path("/d"), max_epochs=None)


def test_the_command_refuses_a_wrong_variant_in_one_line():
    done = subprocess.run([sys.executable, "bench/quality/run.py", "--variant", "x y=1"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "--variant" in done.stderr


def test_seeds_summarise_as_mean_and_sample_standard_deviation():
    runs = {seed: {"metrics": {"polyrec": {"HR@10": value, "only_here": 1.0} if seed == 0 else {"HR@10": value}}} for seed, value in enumerate([0.1, 0.2, 0.3])}
    mean, std = summary(runs)
    assert mean == pytest.approx({"HR@10": 0.2}) and std == pytest.approx({"HR@10": 0.1})


def test_the_defaults_rules_read_the_datas_shape():
    small, huge = ({"num_items": n, "max_history": 50, "history_median": 60, "history_read_whole": 0.4} for n in (1_682, 2_000_000))
    assert ["does not hold" in rule for rule in default_rules(small)] == [False] * 4
    softmax, temperature = default_rules(huge)[2:]
    assert softmax.endswith("items: sampled.") and default_rules(small)[2].endswith("items: full.")
    assert "does not hold" in temperature  # a span of 20 nats is less than 2 × ln(2e6) = 29


def test_the_synthetic_set_follows_its_generating_model(tmp_path, monkeypatch):
    movies = tmp_path / "movies.dat"
    genres = ["Comedy", "Drama|Romance", "Action|Sci-Fi", "Horror", "Comedy|Drama"]
    movies.write_bytes("\n".join(f"{i + 1}::Film {i} ({1970 + 5 * i})::{g}" for i, g in enumerate(genres * 8)).encode("latin-1"))
    monkeypatch.setattr(sys, "argv", ["make_synthetic", "--movies", str(movies), "--users", "6", "--max-length", "30", "--out", str(tmp_path / "out")])
    make_synthetic()
    interactions = pq.read_table(tmp_path / "out" / "interactions.parquet").to_pandas()
    items = pq.read_table(tmp_path / "out" / "items.parquet").to_pandas()
    assert len(items) == 40 and items["year"].tolist()[:2] == [1970, 1975] and items["genres"][1].tolist() == ["Drama", "Romance"]
    assert set(interactions["item_id"]) <= set(items["item_id"])
    for _, user in interactions.groupby("user_id"):
        assert len(user) == 30 and user["item_id"].is_unique  # drawn without replacement, at most --max-length
        assert np.all(np.diff(user["timestamp"].to_numpy()) > 0)
    assert set(interactions["rating"]) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def _capped_run(epochs_run: int, best_epoch: int, cap: float, **hyperparameters) -> dict:
    settings = {"epochs": 300, "train_batch_size": 256, "learning_rate": 0.001} | hyperparameters | {"max_minutes_per_model": cap}
    return {
        "split_hash": "s",
        "stop_reason": "time_capped",
        "hyperparameters": settings,
        "best_epoch": best_epoch,
        "validation_ndcg@10_recbole": 0.0384,
        "train_wall_seconds": 3473.5,
        "epochs": [{"epoch": e} for e in range(epochs_run)],
    }


def test_a_peer_kept_at_a_lower_time_cap_is_trained_further_and_only_then():
    capped = _capped_run(13, 12, cap=55.0)
    assert not peer_is_kept(capped, "s", epochs=300, max_minutes=150)
    assert peer_is_kept(capped, "s", epochs=300, max_minutes=55)
    assert peer_is_kept(capped | {"stop_reason": "early_stopped"}, "s", epochs=300, max_minutes=150)
    assert not peer_is_kept(capped, "another split", epochs=300, max_minutes=55)
    assert peer_is_kept({"split_hash": "s", "hyperparameters": {}}, "s", epochs=300, max_minutes=150)  # popularity, SVD++


@pytest.mark.parametrize("held_back", ["report_only", "no_peer_training"])
def test_a_peer_short_of_the_request_is_trained_further_unless_training_is_held_back(tmp_path, monkeypatch, capsys, held_back):
    import bench.quality.run as bench_run

    monkeypatch.setattr(bench_run, "PEERS", tmp_path)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "peers.json").write_text(json.dumps({"models": {"BERT4Rec": _capped_run(10, 7, cap=35.0), "Pop": {"split_hash": "s"}}}))
    commands = []
    monkeypatch.setattr(bench_run.subprocess, "run", lambda command, check: commands.append(command))
    monkeypatch.setattr(bench_run, "PEERS_PYTHON", tmp_path)  # there: no environment is built
    args = SimpleNamespace(peer_max_epochs=None, peer_max_minutes=150, peer_threads=2, report_only=False, no_peer_training=False)

    bench_run.ensure_peers(tmp_path / "data", "s", ["Pop", "BERT4Rec"], SimpleNamespace(**vars(args) | {held_back: True}))
    flag = "--" + held_back.replace("_", "-")
    assert capsys.readouterr().out.strip().endswith(f"peers kept in {tmp_path / 's'}: Pop; not trained ({flag}): BERT4Rec, reported as kept, if kept at all")
    assert commands == []

    bench_run.ensure_peers(tmp_path / "data", "s", ["Pop", "BERT4Rec"], args)
    assert capsys.readouterr().out.splitlines()[0].endswith(f"peers kept in {tmp_path / 's'}: Pop; to train: BERT4Rec")
    (command,) = commands  # peers.py, for the one short of the request
    assert command[command.index("--models") + 1 : command.index("--threads")] == ["BERT4Rec"]


def test_a_time_capped_peer_continues_from_the_state_it_stopped_in(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(REPO / "bench" / "quality"))  # peers.py imports split_hash from beside itself
    from bench.quality.peers import capped_run_to_continue

    hyperparameters = {"epochs": 300, "train_batch_size": 256, "learning_rate": 0.001}
    best, last = tmp_path / "SASRec-a.pth", tmp_path / "SASRec-a.last.pth"
    torch.save({"epoch": 9, "best_valid_score": 0.0384}, best)
    torch.save({"epoch": 12, "best_valid_score": 0.0384}, last)
    kept = _capped_run(13, 9, cap=55.0) | {"checkpoint": str(best), "last_state": str(last)}
    assert capped_run_to_continue(kept, "s", hyperparameters) == (last, best)
    assert capped_run_to_continue({key: value for key, value in kept.items() if key != "last_state"}, "s", hyperparameters) is None
    last.unlink()
    assert capped_run_to_continue(kept, "s", hyperparameters) is None
    assert capped_run_to_continue(kept, "s", hyperparameters | {"learning_rate": 0.01}) is None
    assert capped_run_to_continue(kept, "another split", hyperparameters) is None
    assert capped_run_to_continue(kept | {"stop_reason": "early_stopped"}, "s", hyperparameters) is None


def test_kept_results_survive_an_edit_of_comments_docstrings_and_layout_but_no_other(tmp_path, monkeypatch):
    import bench.quality.run as bench_run

    monkeypatch.setattr(bench_run, "REPO", tmp_path)
    monkeypatch.setattr(bench_run, "SOURCE_FOLDERS", ("train",))
    module = tmp_path / "train" / "loss.py"
    module.parent.mkdir()

    def fingerprint(source: str) -> str:
        module.write_text(source)
        return bench_run.source_fingerprint()

    trained_with = fingerprint('"""Losses."""\n\n\ndef scale(x):\n    """Doubled."""\n    return 2 * x  # why: the paper\n')
    assert fingerprint('"""The losses, reworded."""\n\ndef scale(x):\n    return 2 * x\n') == trained_with
    assert fingerprint('"""Losses."""\n\n\ndef scale(x):\n    """Doubled."""\n    return 3 * x\n') != trained_with
    assert fingerprint('"""Losses."""\n\n\ndef scale(x):\n    """Doubled."""\n    "a statement, not a docstring"\n    return 2 * x\n') != trained_with


def test_a_variant_warm_started_from_the_default_fine_tunes_that_seeds_default_model(tmp_path, monkeypatch):
    import bench.quality.run as bench_run
    import train.trainer

    started = []

    def fake_training(config):
        started.append(config)
        return SimpleNamespace(test_metrics={"polyrec": {"NDCG@10": 0.1 * len(started)}}, history=[{"validation/NDCG@10": 0.1}])

    monkeypatch.setattr(train.trainer, "run_training", fake_training)
    name, overrides = parse_variant("lora-ft=model.backbone.mode=lora,epochs=1,warm_start_from=<default>")
    kept, models = tmp_path / "polyrec", tmp_path / "models"

    def runs():
        return bench_run.polyrec_runs(name, overrides, [0, 1], Path("/d"), "split", base={}, sources="src", kept=kept, models=models, max_epochs=None)

    first = runs()
    # each seed's default, then the variant from the artifact of that default
    assert [(config.seed, config.model.backbone.mode) for config in started] == [(0, "frozen"), (0, "lora"), (1, "frozen"), (1, "lora")]
    for default, variant in (started[0:2], started[2:4]):
        assert Path(default.output).parent == Path(variant.output).parent == models  # beside the records, not in them
        assert default.warm_start_from is None
        assert variant.warm_start_from == str(Path(default.output) / "artifact")
    assert first[1]["metrics"]["polyrec"]["NDCG@10"] == pytest.approx(0.4)
    assert len(list(kept.glob("*.json"))) == 4  # one record per training
    # the variant's result is kept under its config with the placeholder, not a machine's path: a rerun trains nothing
    assert runs() == first and len(started) == 4
