"""GeoWizard's changes to Stable Diffusion 2's UNet that are code, not configuration (densediff/backbones/geowizard.py
lists all four): the class label (geometry switcher + domain) and the joint depth-normal self-attention."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

# ---------------------------------------------------------------------------------------------------------------
# 1. The class label: geometry switcher + domain, as sin/cos of one-hot vectors
# ---------------------------------------------------------------------------------------------------------------
GEOMETRIES = {"depth": (0.0, 1.0), "normal": (1.0, 0.0)}
DOMAINS = {"indoor": (1.0, 0.0, 0.0), "outdoor": (0.0, 1.0, 0.0), "object": (0.0, 0.0, 1.0)}
CLASS_LABEL_DIM = 10  # [sin(g), cos(g)]: 4, [sin(d), cos(d)]: 6; the UNet's projection_class_embeddings_input_dim


def _sin_cos(one_hot: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.sin(one_hot), torch.cos(one_hot)], dim=-1)


def _domain_one_hot(domain: str | Sequence[str], batch_size: int) -> torch.Tensor:
    names = [domain] * batch_size if isinstance(domain, str) else list(domain)
    if len(names) != batch_size:
        raise ValueError(f"got {len(names)} domains for a batch of {batch_size} samples")
    unknown = sorted({name for name in names if name not in DOMAINS})
    if unknown:
        raise ValueError(f"unknown GeoWizard domain {unknown[0]!r}: expected one of {', '.join(DOMAINS)}")
    return torch.tensor([DOMAINS[name] for name in names])


def geowizard_class_labels(domain: str | Sequence[str], batch_size: int, device: torch.device | str | None = None,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Class labels [2B, 10] for the batch [depth_1..depth_B, normal_1..normal_B].

    Row = [sin(g), cos(g), sin(d), cos(d)]: g is the one-hot geometry (depth [0, 1], normal [1, 0]), each repeated
    B times in a row (repeat_interleave); d is the one-hot domain of the sample (indoor [1, 0, 0], outdoor [0, 1, 0],
    object [0, 0, 1]), the same B rows for both halves (repeat). `domain` is one name for the whole batch (inference)
    or one name per sample (training on mixed data).
    """
    geometry = _sin_cos(torch.tensor([GEOMETRIES["depth"], GEOMETRIES["normal"]])).repeat_interleave(batch_size, 0)
    domains = _sin_cos(_domain_one_hot(domain, batch_size)).repeat(2, 1)
    return torch.cat([geometry, domains], dim=-1).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------
# 2. Joint depth-normal self-attention
# ---------------------------------------------------------------------------------------------------------------
def _joint_keys_values(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, N, C) keys/values of [depth | normal] -> (2B, 2N, C): sample i of either half gets [depth_i, normal_i].

    As in the reference: both halves' tokens are concatenated along the token axis (depth first) and the result is
    shared by the two halves (the same keys for depth_i and normal_i)."""
    if key.shape[0] % 2:
        raise ValueError(
            f"GeoWizard joint attention needs an even batch [depth_1..depth_B, normal_1..normal_B], got batch size "
            f"{key.shape[0]}; run depth and normal together, or disable it with set_geowizard_attention(joint=False)")
    key_depth, key_normal = key.chunk(2, dim=0)
    value_depth, value_normal = value.chunk(2, dim=0)
    key = torch.cat([key_depth, key_normal], dim=1).repeat(2, 1, 1)
    value = torch.cat([value_depth, value_normal], dim=1).repeat(2, 1, 1)
    return key, value


class JointAttnProcessor:
    """GeoWizard's cross-domain geometric self-attention on torch SDPA, for diffusers' `Attention` (`attn1`).

    Everything around the attention itself (spatial/group norm, 4-d inputs, norm_q/norm_k, output projection,
    dropout, residual connection and output rescaling) follows diffusers' `AttnProcessor2_0`, so with a batch of
    independent halves it differs from it only in what the keys and values are. Self-attention only: an
    `encoder_hidden_states` or an `attention_mask` is refused rather than silently misused (the UNet passes neither
    to `attn1`; the reference ignores that case too).
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs
                 ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("JointAttnProcessor is for self-attention (attn1): got encoder_hidden_states")
        if attention_mask is not None:
            raise NotImplementedError("GeoWizard joint attention does not support an attention mask")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key, value = _joint_keys_values(attn.to_k(hidden_states), attn.to_v(hidden_states))

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (2B, heads, N, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (2B, heads, 2N, d)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attention(query, key, value, attn.scale)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        """(batch, heads, tokens, head_dim) in and out."""
        return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False, scale=scale)


class XFormersJointAttnProcessor(JointAttnProcessor):
    """The same joint attention on xformers' memory-efficient kernel (optional extra, CUDA only)."""

    def __init__(self):
        if importlib.util.find_spec("xformers") is None:
            raise RuntimeError("attention='xformers' needs the optional extra: pip install 'densediff[xformers]' "
                               "(CUDA only); the default attention='sdpa' needs nothing")

    @staticmethod
    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        import xformers.ops

        # xformers wants (batch, tokens, heads, head_dim)
        out = xformers.ops.memory_efficient_attention(query.transpose(1, 2).contiguous(),
                                                      key.transpose(1, 2).contiguous(),
                                                      value.transpose(1, 2).contiguous(), scale=scale)
        return out.transpose(1, 2)


def self_attention_modules(unet: torch.nn.Module) -> dict[str, Attention]:
    """`attn1` of every BasicTransformerBlock, by module name (SD2: 16 of them)."""
    return {f"{name}.attn1": module.attn1 for name, module in unet.named_modules()
            if isinstance(module, BasicTransformerBlock)}


def set_geowizard_attention(unet: torch.nn.Module, joint: bool = True, backend: str = "sdpa") -> None:
    """Install the attention processors: joint (GeoWizard) or per-branch self-attention on every `attn1`, and
    diffusers' standard processor of the same backend everywhere else (the cross-attention `attn2`).

    Use this instead of `unet.enable_xformers_memory_efficient_attention()` / `set_attn_processor(...)`, which would
    replace the joint processors with per-branch ones, i.e. GeoWizard's own silent failure mode in reverse.
    """
    if backend == "sdpa":
        joint_processor, plain = JointAttnProcessor, AttnProcessor2_0
    elif backend == "xformers":
        from diffusers.models.attention_processor import XFormersAttnProcessor

        joint_processor, plain = XFormersJointAttnProcessor, XFormersAttnProcessor
    else:
        raise ValueError(f"attention backend must be 'sdpa' or 'xformers', got {backend!r}")
    self_attention = set(map(id, self_attention_modules(unet).values()))
    if not self_attention:
        raise ValueError("this UNet has no transformer blocks: nothing to make joint")
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(joint_processor() if joint and id(module) in self_attention else plain())


def uses_joint_attention(unet: torch.nn.Module) -> bool:
    """True when every `attn1` runs GeoWizard's joint attention."""
    modules = self_attention_modules(unet).values()
    return bool(modules) and all(isinstance(m.processor, JointAttnProcessor) for m in modules)
