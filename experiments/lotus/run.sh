#!/usr/bin/env bash
# Lotus-G and Lotus-D against E2E-FT and Marigold at the prior budget on the embedded default
# (experiments/lotus/README.md): the trainings, the test-split evaluations and the inference timing, as recorded.
#   bash experiments/lotus/run.sh [OUT]          (from the repository root; OUT defaults to outputs/lotus)
#   PY=/path/to/python bash experiments/lotus/run.sh
set -euo pipefail
OUT=${1:-outputs/lotus}
PY=${PY:-python}

# 1. training, 300 steps of batch 8, seed 42 (the prior budget). The Lotus pair on both backbones is also what
#    `make prior` runs for these two recipes (their rows of experiments/prior/); the baselines on backbone=tiny only.
$PY train.py -m experiment=prior/lotus_depth,prior/lotus_depth_d backbone=tiny,tiny_random \
    hydra.sweep.dir=$OUT/prior_sweep trainer.enable_progress_bar=false
$PY train.py -m experiment=prior/e2e_depth,prior/marigold_depth backbone=tiny \
    hydra.sweep.dir=$OUT/baseline_sweep trainer.enable_progress_bar=false
# control: Lotus-G and -D with Marigold's affine depth target (scored in depth space, as E2E-FT and Marigold are)
$PY train.py -m experiment=prior/lotus_depth,prior/lotus_depth_d backbone=tiny task.encoding=affine \
    hydra.sweep.dir=$OUT/affine_sweep trainer.enable_progress_bar=false
# ablation: Lotus-G and -D without the detail preserver (no reconstruction half)
$PY train.py -m experiment=prior/lotus_depth,prior/lotus_depth_d backbone=tiny ++objective.detail_preserver=false \
    hydra.sweep.dir=$OUT/no_preserver_sweep trainer.enable_progress_bar=false

# 2. test split (128 procedural scenes), each checkpoint at its recipe's inference; Marigold also at one step
#    (leading spacing = its recipe's scheduler: t = 1; trailing: t = 999, E2E-FT's fix)
LOTUS_G=$OUT/prior_sweep/0/checkpoints/last.ckpt        # prior/lotus_depth, backbone=tiny
LOTUS_G_RANDOM=$OUT/prior_sweep/1/checkpoints/last.ckpt # prior/lotus_depth, backbone=tiny_random
LOTUS_D=$OUT/prior_sweep/2/checkpoints/last.ckpt        # prior/lotus_depth_d, backbone=tiny
LOTUS_D_RANDOM=$OUT/prior_sweep/3/checkpoints/last.ckpt # prior/lotus_depth_d, backbone=tiny_random
E2E=$OUT/baseline_sweep/0/checkpoints/last.ckpt         # prior/e2e_depth, backbone=tiny
MARIGOLD=$OUT/baseline_sweep/1/checkpoints/last.ckpt    # prior/marigold_depth, backbone=tiny
LOTUS_G_AFFINE=$OUT/affine_sweep/0/checkpoints/last.ckpt  # prior/lotus_depth task.encoding=affine, backbone=tiny
LOTUS_D_AFFINE=$OUT/affine_sweep/1/checkpoints/last.ckpt  # prior/lotus_depth_d task.encoding=affine, backbone=tiny
LOTUS_G_NOPRES=$OUT/no_preserver_sweep/0/checkpoints/last.ckpt  # prior/lotus_depth, no detail preserver
LOTUS_D_NOPRES=$OUT/no_preserver_sweep/1/checkpoints/last.ckpt  # prior/lotus_depth_d, no detail preserver
evaluate() { $PY evaluate.py ckpt=$2 dataset=procedural logger=none trainer.enable_progress_bar=false \
    hydra.run.dir=$OUT/test/$1 "${@:3}"; }
evaluate lotus_g $LOTUS_G
evaluate lotus_g_random $LOTUS_G_RANDOM
evaluate lotus_d $LOTUS_D
evaluate lotus_d_random $LOTUS_D_RANDOM
evaluate lotus_g_affine $LOTUS_G_AFFINE
evaluate lotus_d_affine $LOTUS_D_AFFINE
evaluate lotus_g_no_preserver $LOTUS_G_NOPRES
evaluate lotus_d_no_preserver $LOTUS_D_NOPRES
evaluate e2e_ft $E2E
evaluate marigold_4x5 $MARIGOLD
evaluate marigold_1_leading $MARIGOLD inference.steps=1 inference.ensemble=1
evaluate marigold_1_trailing $MARIGOLD inference.steps=1 inference.ensemble=1 inference.timestep_spacing=trailing
# reference: backbone=tiny before any fine-tuning, E2E-FT's single step (what every run starts from)
$PY evaluate.py experiment=quickstart dataset=procedural logger=none trainer.enable_progress_bar=false \
    hydra.run.dir=$OUT/test/untrained_tiny

# 3. inference time per image (one image per call, one thread, 32 test scenes after one warm-up call)
$PY experiments/lotus/time_inference.py --out $OUT/inference_times.json \
    lotus_g=$LOTUS_G lotus_d=$LOTUS_D e2e_ft=$E2E marigold_4x5=$MARIGOLD \
    marigold_1_leading=$MARIGOLD:steps=1,ensemble=1 \
    marigold_1_trailing=$MARIGOLD:steps=1,ensemble=1,timestep_spacing=trailing

# 4. seconds per training step (the recipes take turns: 3 rounds of 20 steps each, one thread)
$PY experiments/lotus/time_training.py --out $OUT/training_steps.json

# 5. one JSON of all of the above (experiments/lotus/results.json)
$PY experiments/lotus/collect.py $OUT
