"""Which UNet weights train: all of them (`full`), peft LoRA on every attention projection (`lora`), or LoRA on
the self-attention projections only (`lora_self_attn`, DMP's self_attn_only). The VAE is always frozen."""

from __future__ import annotations

import torch

ADAPTERS = ("full", "lora", "lora_self_attn")
# peft matches list entries as exact names or name suffixes (LoraConfig.target_modules).
LORA_TARGETS = {
    "lora": ["to_q", "to_k", "to_v", "to_out.0"],
    "lora_self_attn": ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"],
}


def apply_adapter(unet: torch.nn.Module, kind: str, rank: int = 8, alpha: float | None = None) -> None:
    """Set requires_grad on the UNet for `kind`, adding LoRA layers where asked."""
    if kind not in ADAPTERS:
        raise ValueError(f"unknown adapter {kind!r}; available: {', '.join(ADAPTERS)}")
    if kind == "full":
        unet.requires_grad_(True)
        return
    if rank < 1:
        raise ValueError(f"adapter.rank must be >= 1 for {kind}, got {rank}")
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=int(rank), lora_alpha=float(alpha or rank), init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS[kind])))


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
