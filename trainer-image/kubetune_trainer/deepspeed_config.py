"""The DeepSpeed config for a spec. Everything the Hugging Face Trainer owns (batch
sizes, accumulation, clipping, optimizer and scheduler values) is ``"auto"`` so the two
never disagree; the ZeRO section comes from ``spec.deepspeed``."""

from __future__ import annotations

from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobSpec


def build_deepspeed_config(spec: FineTuneJobSpec) -> dict[str, Any] | None:
    """None when the spec asks for plain DDP."""
    deepspeed = spec.deepspeed
    if deepspeed is None:
        return None
    zero: dict[str, Any] = {"stage": deepspeed.zero_stage}
    if deepspeed.zero_stage >= 1 and deepspeed.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if deepspeed.zero_stage == 3:
        if deepspeed.offload_params == "cpu":
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        zero.update(
            {
                "overlap_comm": True,
                "contiguous_gradients": True,
                "reduce_bucket_size": "auto",
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                # Gather the 16-bit weights on save so that save_pretrained writes whole
                # tensors (an adapter saved from partitions would be empty).
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    elif deepspeed.zero_stage in (1, 2):
        zero.update({"overlap_comm": True, "contiguous_gradients": True, "allgather_bucket_size": 2e8})
    precision = spec.training.precision
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # No "optimizer" section: the Trainer builds the optimizer (with the spec's learning-rate
    # groups), DeepSpeed's CPU Adam when the optimizer state is offloaded (see trainer.py).
    return config
