# The bundled models' recipe, sourced by train_bundled.sh and sweep_bundled.sh: the architecture, the data
# and the optimiser settings every objective shares. Arguments given after RECIPE override it.
ARCH=vit_tiny_patch16_224
KWARGS='{"img_size":28,"patch_size":4,"embed_dim":64,"depth":6,"num_heads":4}'
BATCH=128
RECIPE=(--model "$ARCH" --model-kwargs "$KWARGS" --data fashion-mnist --batch-size "$BATCH"
        --lr 1e-3 --save-every 100 --seed 0 --threads 1 --no-progress)
