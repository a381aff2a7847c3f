#!/usr/bin/env bash
# How the v2 aligners were made (docs/pretrained.md). FAMILY mlp: 13 MLP zoos (2-6 Linear layers,
# widths 16-512, ReLU/GELU/tanh; digits, mnist1d and the synthetic teacher task). FAMILY cnn: 8 digits
# CNN zoos (1-4 convs of 8-64 channels, with and without BatchNorm and pooling). Then one aligner per
# family, trained on all its zoos with a one-cycle schedule and validated every 100 steps (best
# checkpoint by validation barrier). Run from the repository root; on the 2-core machine of
# docs/pretrained.md (deepalign-mlp-v2 took two stages; deepalign-cnn-v2 the cnn line alone):
#   bash pretrained/train-v2.sh mlp ./out 2 1 80 13 && mv ./out/mlp ./out/mlp-stage1
#   ARGS="--init ./out/mlp-stage1 --relative-loss --batch-size 16 --lr 5e-4" \
#     bash pretrained/train-v2.sh mlp ./out 2 1 35 10
#   bash pretrained/train-v2.sh cnn ./out 1 1 40 30
# deepalign-mlp-v3 is v2 fine-tuned on the same zoos (best validation at step 700; this run was
# stopped at step 300 and continued by adding --resume to ARGS):
#   ARGS="--init deepalign-mlp-v2 --relative-loss --batch-size 32 --lr 5e-4 --val-pairs 104" \
#     bash pretrained/train-v2.sh mlp ./out 1 1 65 20
# deepalign-mlp-v4 is v3 grown by one encoder layer and fine-tuned (stopped by the 70-minute limit at
# step 836, then continued to step 882 by adding --resume to ARGS, from a copy of last.pt taken at
# step 800, since this script then deleted last.pt at its end; best at step 800):
#   ARGS="--init deepalign-mlp-v3 --add-layers 1 --relative-loss --batch-size 24 --lr 5e-4 --val-pairs 104" \
#     bash pretrained/train-v2.sh mlp ./out 1 1 70 14
# usage: bash pretrained/train-v2.sh FAMILY OUT ZOO_JOBS TRAIN_THREADS MAX_MINUTES EPOCHS
#   ZOO_JOBS      zoos trained at once (one thread each)
#   TRAIN_THREADS torch threads for the aligner's training
#   MAX_MINUTES   training stops after this long (the best validated aligner is kept)
#   EPOCHS        passes over the zoos' training networks (sets the one-cycle length)
# ZOOS=DIR reuses (or resumes) zoos in DIR; ZOO_ONLY=1 stops after the zoos; ARGS adds train-aligner options.
set -eu
FAMILY=$1; OUT=$2; JOBS=$3; THREADS=$4; MINUTES=$5; EPOCHS=$6
Z=${ZOOS:-$OUT/zoos}; mkdir -p "$Z" "$OUT"
log=$OUT/log-$FAMILY.txt
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MODELMERGE_THREADS=1
t0=$(date +%s)
# name, models, zoo options
if [ "$FAMILY" = mlp ]; then
ZOO_LIST="
d-128x3 240 --widths 64,128,128,128,10 --dataset digits
d-64 150 --widths 64,64,10 --dataset digits
d-256-gelu 100 --widths 64,256,10 --activation gelu --dataset digits
d-32-64-tanh 150 --widths 64,32,64,10 --activation tanh --dataset digits
d-96x4-gelu 120 --widths 64,96,96,96,96,10 --activation gelu --dataset digits
d-16x2 150 --widths 64,16,16,10 --dataset digits
d-48-96-32 120 --widths 64,48,96,32,10 --dataset digits
m-128x3 150 --widths 40,128,128,128,10 --dataset mnist1d
m-256-128-64 100 --widths 40,256,128,64,10 --dataset mnist1d
m-64x5 120 --widths 40,64,64,64,64,64,10 --dataset mnist1d
m-192x2-gelu 100 --widths 40,192,192,10 --activation gelu --dataset mnist1d
t-512-128 60 --widths 32,512,128,10 --dataset teacher
t-48x5-tanh 120 --widths 32,48,48,48,48,48,10 --activation tanh --dataset teacher
"
SHAPE="--channels 16 --layers 2 --feature-dim 64 --readout-hidden 128 --output-dims 16"
else
ZOO_LIST="
c-16 120 --arch cnn --channels 16 --hidden 64
c-16-32 150 --arch cnn --channels 16,32 --hidden 64
c-8-16-32-bn 60 --arch cnn --channels 8,16,32 --batchnorm
c-32-64-bn 40 --arch cnn --channels 32,64 --hidden 64 --batchnorm
c-16x2-32x2 50 --arch cnn --channels 16,16,32,32
c-24-48-nopool 40 --arch cnn --channels 24,48 --hidden 32 --no-pool
c-12-24-bn-nopool 40 --arch cnn --channels 12,24 --batchnorm --no-pool
c-64-gelu 40 --arch cnn --channels 64 --hidden 64 --activation gelu
"
SHAPE="--channels 16 --layers 2 --feature-dim 64 --readout-hidden 128 --output-dims 16"
fi
echo "$ZOO_LIST" | grep . | xargs -P "$JOBS" -L 1 sh -c \
  'name=$0; n=$1; shift; python3 -m modelmerge zoo "$@" -n $n -o '"$Z"'/$name --threads 1 >'"$Z"'/$name.log 2>&1 && echo "zoo $name done"' >>"$log"
echo "zoos done in $(( $(date +%s) - t0 )) s" >>"$log"
[ "${ZOO_ONLY:-0}" = 1 ] && exit 0
# --init brings its own shape (train-aligner refuses shape options that differ from it)
case " ${ARGS:-} " in *" --init "*|*" --init="*) SHAPE="" ;; esac
zoos=""
for name in $(echo "$ZOO_LIST" | awk 'NF {print $1}'); do zoos="$zoos --zoo $Z/$name"; done
# shellcheck disable=SC2086
python3 -m modelmerge train-aligner $zoos --data zoo -o "$OUT/$FAMILY" --force $SHAPE \
  --lr 1e-3 --schedule onecycle --epochs "$EPOCHS" --batch-size 8 --val-every 100 --val-pairs 26 \
  --alpha-min 0.25 --alpha-max 0.75 --max-minutes "$MINUTES" --threads "$THREADS" ${ARGS:-} >>"$log" 2>&1
echo "all done in $(( $(date +%s) - t0 )) s" >>"$log"
# OUT/FAMILY/last.pt stays: a run stopped by MAX_MINUTES continues with --resume added to ARGS
