"""GPU check, prepared for a machine with one GPU (NOT run on this repository's CPU-only machine): the training step of
a randomly initialised ~0.5B-parameter decoder backbone through DeepSpeed in bf16 over NCCL, in LoRA and in full
fine-tuning, then the model exported as an artifact and served from the GPU (``serve.model_runtime`` on cuda).

Per mode it prints samples/s (training windows), tokens/s (item-text tokens through the backbone) and MFU: the
backbone's FLOPs per token (6 N for full fine-tuning; 4 N for LoRA, whose frozen weights get no weight gradients)
times tokens/s over the GPU's peak bf16 FLOP/s (``--peak-tflops``, 989 for an H100/H200 SXM dense).

    .venv/bin/python bench/gpu_check.py --data runs/default/data --output /tmp/gpu-check [--steps 20] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.storage import read_table, resolve  # noqa: E402
from data import schema  # noqa: E402
from data.features import load_tokenizer  # noqa: E402
from data.manifest import load_manifest  # noqa: E402
from serve.messages import RetrievalRequest  # noqa: E402
from serve.model_runtime import ServingModel  # noqa: E402
from train.artifact import save_artifact  # noqa: E402
from train.config import BackboneConfig, TrainConfig  # noqa: E402
from train.trainer import TrainingModule, _parameter_groups, build_model, deepspeed_config, read_training_data, training_batch  # noqa: E402
from train.weighting import LossWeighting  # noqa: E402

#: A Qwen2-shaped decoder of about 0.5B parameters (24 layers of width 1024, grouped-query attention).
DECODER = {
    "model_type": "qwen2",
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "intermediate_size": 5504,
    "max_position_embeddings": 512,
}


def check_mode(mode: str, args: argparse.Namespace, vocab_size: int) -> None:
    import deepspeed
    import ray

    config = TrainConfig(data=args.data, output=str(Path(args.output) / mode), batch_size=args.batch_size)
    config.model.backbone = BackboneConfig(random_init_config={**DECODER, "vocab_size": vocab_size}, mode=mode, pooling="last", text_batch_size=64)
    config.model.user_model.hidden_size, config.model.user_model.num_heads = 512, 8
    config.model.tasks.num_sampled_negatives = 256
    config.deepspeed.precision = "bf16"
    config.scaling.use_gpu = True
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True)
    inputs, windows, _ = read_training_data(resolve(config.data), config.window_targets, config.validation_sample_rows)
    model = build_model(config, inputs)
    backbone_parameters = sum(param.numel() for param in model.item_encoder.backbone.parameters())
    module = TrainingModule(model, LossWeighting(config.model.loss_weighting, model.task_names))
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=_parameter_groups(module, config), config=deepspeed_config(config))
    tokens = [0]

    def count_tokens(_module, _args, kwargs):
        tokens[0] += int(kwargs["attention_mask"].sum())

    model.item_encoder.backbone.register_forward_pre_hook(count_tokens, with_kwargs=True)

    batches = [training_batch(rows, inputs.max_history) for rows in windows.iter_batches(batch_size=config.batch_size, batch_format="numpy")]
    engine.train()
    for step in range(args.steps + args.warmup_steps):
        if step == args.warmup_steps:
            torch.cuda.synchronize()
            tokens[0], started = 0, time.perf_counter()
        batch = {name: tensor.to(engine.device) for name, tensor in batches[step % len(batches)].items()}
        total, _, _ = engine(batch)
        engine.backward(total)
        engine.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    flops_per_token = (6 if mode == "full" else 4) * backbone_parameters
    tokens_per_second = tokens[0] / seconds
    print(
        f"{mode}: backbone {backbone_parameters / 1e9:.2f}B parameters, {args.steps * config.batch_size / seconds:.1f} samples/s, "
        f"{tokens_per_second:,.0f} tokens/s, MFU {flops_per_token * tokens_per_second / (args.peak_tflops * 1e12):.1%}, "
        f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    )

    # The trained model, exported as the trainer does (fp32 on the CPU), then served from the GPU.
    model = engine.module.model.float().cpu().eval()
    model.tokenizer = load_tokenizer(inputs.tokenizer_path)
    data = resolve(config.data)
    artifact = save_artifact(
        model,
        Path(config.output) / "artifact",
        items=inputs.items,
        users=read_table(data, schema.USER_VOCAB_PATH),
        model_version=f"gpu-check-{mode}",
        data_manifest_hash=inputs.data_hash,
        metrics={},
        rating=inputs.rating,
    )
    served = ServingModel(str(artifact))
    assert served.device.type == "cuda", served.device
    request = RetrievalRequest(
        model=str(artifact),
        user_id=next(iter(served.user_index)),
        history=list(served.item_index)[:20],
        history_ratings=[4.0] * 20,
        interests="a science fiction film",
        num_candidates=100,
        registry_version=0,
    )
    started = time.perf_counter()
    for _ in range(10):
        candidates = served.retrieve([request] * 16, history_length=50, interests_weight=0.3)
        served.rank(candidates, {"retrieval": 1.0, "like": 1.0, "rating": 0.1})
    torch.cuda.synchronize()
    print(f"{mode}: served from {served.device}: {160 / (time.perf_counter() - started):.0f} requests/s (batches of 16, 100 candidates)")
    del engine, served
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a preprocessing output")
    parser.add_argument("--output", required=True)
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_check.py needs a GPU")
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl")
    vocab_size = len(load_tokenizer(load_manifest(args.data).tokenizer.path))
    for mode in args.modes:
        check_mode(mode, args, vocab_size)


if __name__ == "__main__":
    main()
