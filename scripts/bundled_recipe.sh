# The bundled models' recipe, sourced by train_bundled.sh and sweep_bundled.sh: the architecture, the data
# and the optimiser settings every objective shares. Arguments given after RECIPE override it.
# Depth 12, as the paper's ViT-B, so that a decoder-like last block is a quarter of "late" at most
# (docs/reproduction.md, "Toward 12 blocks").
ARCH=vit_tiny_patch16_224
KWARGS='{"img_size":28,"patch_size":4,"embed_dim":64,"depth":12,"num_heads":4}'
BATCH=128
RECIPE=(--model "$ARCH" --model-kwargs "$KWARGS" --data fashion-mnist --batch-size "$BATCH"
        --lr 1e-3 --save-every 100 --seed 0 --threads 1 --no-progress)
# SimMIM (alone and as the hybrid's MIM half) predicts pixels through two width-128 blocks: with the
# official linear head, blocks 9-12 of the 12 turn into a pixel decoder.
SIMMIM_HEAD=(--simmim-head-depth 2 --decoder-dim 128 --decoder-heads 4)
# MoCo (alone and as the hybrid's CL half) warms up for 94 steps (a fifth of an epoch) to a peak learning
# rate of 2e-3: at 1e-3 its late attention barely concentrates at depth 12 (docs/reproduction.md,
# "The CL recipe at depth 12").
CL_SCHEDULE=(--warmup-steps 94 --lr 2e-3)
