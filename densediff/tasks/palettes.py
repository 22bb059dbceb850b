"""Colour palettes of the segmentation codec (class id -> RGB uint8 colour; index = class id).

Data only. Where the numbers come from:
- ADE20K_PALETTE: the standard 150-colour ADE20K palette of MMSegmentation (`mmseg/datasets/ade.py`,
  `ADE20KDataset.METAINFO["palette"]`), identical to DMP's `tools/color2cls.py` PALETTE1 (checked entry by entry).
  It holds one duplicate: (140, 140, 140) is both class 6 (road) and class 48 (skyscraper).
- BEDROOM_PALETTE: DMP's PALETTE2 (`shinying/dmp` `tools/color2cls.py` / `cls2color.py`;
docs/protocols.md#segmentation),
  the ADE20K palette with the 25 entries of BEDROOM_OVERRIDES replaced by softer, well separated colours. DMP trains
  its segmentation LoRA on maps coloured with it and evaluates the 29 BEDROOM_CLASSES (`target_classes`).
- PROCEDURAL_PALETTE: ours, for PROCEDURAL_CLASSES (the classes of densediff.data.procedural, whose CLASS_NAMES they
  are): six corners of the RGB cube (pairwise at least 255 apart), leaving black for ignored pixels and white unused.
"""

from __future__ import annotations

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand",
    "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator",
    "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

# DMP PALETTE2 = ADE20K_PALETTE with these entries replaced (class id: colour)
BEDROOM_OVERRIDES = {
    7: (251, 128, 114), 10: (219, 219, 141), 14: (247, 182, 210), 15: (179, 222, 105), 17: (141, 211, 199),
    18: (255, 237, 111), 19: (188, 189, 34), 22: (204, 235, 197), 27: (23, 190, 207), 28: (174, 199, 232),
    30: (31, 119, 180), 36: (252, 205, 229), 39: (253, 180, 98), 41: (197, 176, 213), 44: (196, 156, 148),
    57: (128, 177, 211), 66: (255, 152, 150), 67: (227, 119, 194), 82: (44, 160, 44), 85: (148, 103, 189),
    97: (152, 223, 138), 125: (158, 218, 229), 131: (214, 39, 40), 134: (255, 127, 14), 135: (255, 187, 120),
}
BEDROOM_PALETTE = tuple(BEDROOM_OVERRIDES.get(i, colour) for i, colour in enumerate(ADE20K_PALETTE))
# DMP's `target_classes`: the 25 re-coloured classes plus wall, floor, ceiling and windowpane
BEDROOM_CLASSES = tuple(sorted({0, 3, 5, 8} | set(BEDROOM_OVERRIDES)))

PROCEDURAL_CLASSES = ("wall", "floor", "ceiling", "box", "sphere", "cylinder")  # densediff.data.procedural.CLASS_NAMES
PROCEDURAL_PALETTE = (
    (0, 0, 255),  # wall
    (255, 0, 0),  # floor
    (0, 255, 255),  # ceiling
    (255, 255, 0),  # box
    (0, 255, 0),  # sphere
    (255, 0, 255),  # cylinder
)

# The multi-task benchmarks (docs/paradigms.md#diffusionmtl): PASCAL VOC's 21 classes, the 7 human-part groups and
# NYUD's 40 classes, coloured with the PASCAL VOC colour map (bit-interleaved class ids, the devkit's labelcolormap).
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
HUMAN_PART_CLASSES = ("background", "head", "torso", "uarm", "larm", "uleg", "lleg")


def voc_colour_map(n: int) -> tuple[tuple[int, int, int], ...]:
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


IGNORE_COLOUR = (0, 0, 0)  # what an ignored pixel is encoded as (DMP's --filter also maps to black)


def palette_info(name: str) -> tuple[tuple[tuple[int, int, int], ...], tuple[str, ...], tuple[int, ...] | None]:
    """(colours, class names, classes the mean IoU is taken over, None = all) of a palette by name."""
    if name == "ade20k":
        return ADE20K_PALETTE, ADE20K_CLASSES, None
    if name == "bedroom":
        return BEDROOM_PALETTE, ADE20K_CLASSES, BEDROOM_CLASSES
    if name == "procedural":
        return PROCEDURAL_PALETTE, PROCEDURAL_CLASSES, None
    if name == "voc":
        return voc_colour_map(21), VOC_CLASSES, None
    if name == "human_parts":
        return voc_colour_map(7), HUMAN_PART_CLASSES, None
    if name == "nyud":
        return voc_colour_map(40), tuple(f"class_{i}" for i in range(40)), None
    raise ValueError(f"task.palette must be 'ade20k', 'bedroom', 'procedural', 'voc', 'human_parts' or 'nyud', "
                     f"got {name!r}")
