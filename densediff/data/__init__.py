"""Datasets in their real on-disk layouts, the procedural scenes, batch mixing and the datamodule.

Every dataset returns the same sample dict: "rgb" (3,H,W) in [0,1], "valid_mask" (H,W) bool, "name" str, and the
requested task keys ("depth" (H,W) metres, "normals" (3,H,W) canonical unit vectors, ...).
"""
