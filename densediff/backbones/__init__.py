"""Backbones: a pretrained diffusion model (UNet, VAE, scheduler, empty-prompt embedding) loaded from a
diffusers-format folder or a hub id."""

from densediff.backbones.load import Backbone, BackboneNotFoundError, load_backbone, widen_conv_in

__all__ = ["Backbone", "BackboneNotFoundError", "load_backbone", "widen_conv_in"]
