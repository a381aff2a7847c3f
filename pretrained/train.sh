#!/usr/bin/env bash
# How the bundled aligners were made (docs/pretrained.md): builds the training zoos, then trains
# deepalign-mlp-v1 and deepalign-cnn-v1 with torchrun (DDP, gloo). Run from the repository root on a
# many-core machine, e.g.: bash pretrained/train.sh ./out 0.85 10 4 330 200
# (the released ones: a lent 16-core machine, 10 + 4 ranks, 330 s of training each).
# usage: bash pretrained/train.sh OUT SCALE NPROC_MLP NPROC_CNN TRAIN_SECONDS EPOCHS
# MLP_ARGS / CNN_ARGS add train-aligner options, e.g. MLP_ARGS='--init deepalign-mlp-v1 --lr 1e-3' to fine-tune.
set -u
OUT=$1; S=$2; NM=$3; NC=$4; SECS=$5; EP=$6
python3 -m pip install --no-deps -q "${MNIST1D_WHEEL:-mnist1d}" 2>/dev/null || true
export PYTHONPATH=$PWD OMP_NUM_THREADS=1 MODELMERGE_THREADS=1
Z=/tmp/zoos; mkdir -p $Z $OUT
log=$OUT/log.txt
n() { python3 -c "print(max(8, int($1 * $S)))"; }
t0=$(date +%s)
python3 -m modelmerge zoo --widths 64,128,128,128,10 --dataset digits -n $(n 400) -o $Z/mlp-digits-128 --threads 2 >>$log 2>&1 &
python3 -m modelmerge zoo --widths 40,128,128,128,10 --dataset mnist1d -n $(n 300) -o $Z/mlp-mnist1d-128 --threads 3 >>$log 2>&1 &
python3 -m modelmerge zoo --widths 64,48,96,32,10 --dataset digits -n $(n 200) -o $Z/mlp-digits-48-96-32 --threads 2 >>$log 2>&1 &
python3 -m modelmerge zoo --widths 40,256,128,64,10 --dataset mnist1d -n $(n 200) -o $Z/mlp-mnist1d-256-128-64 --threads 4 >>$log 2>&1 &
python3 -m modelmerge zoo --widths 64,96,96,10 --dataset digits -n $(n 150) -o $Z/mlp-digits-96x2 --threads 1 >>$log 2>&1 &
python3 -m modelmerge zoo --arch cnn --channels 16,32 --hidden 64 --dataset digits -n $(n 300) -o $Z/cnn-digits --threads 4 >>$log 2>&1 &
wait
echo "zoos done in $(( $(date +%s) - t0 )) s" >>$log
timeout $SECS torchrun --nproc-per-node $NM --master-port 29611 -m modelmerge train-aligner \
  --zoo $Z/mlp-digits-128 --zoo $Z/mlp-mnist1d-128 --zoo $Z/mlp-digits-48-96-32 --zoo $Z/mlp-mnist1d-256-128-64 \
  --zoo $Z/mlp-digits-96x2 --data zoo -o $OUT/mlp --epochs $EP --alpha-min 0.25 --alpha-max 0.75 ${MLP_ARGS:-} >>$log 2>&1 &
timeout $SECS torchrun --nproc-per-node $NC --master-port 29612 -m modelmerge train-aligner \
  --zoo $Z/cnn-digits --data digits -o $OUT/cnn --epochs $EP --alpha-min 0.25 --alpha-max 0.75 ${CNN_ARGS:-} >>$log 2>&1 &
wait
echo "all done in $(( $(date +%s) - t0 )) s" >>$log
rm -f $OUT/mlp/last.pt $OUT/cnn/last.pt
for z in $Z/*; do python3 -c "import json,sys; d=json.load(open('$z/zoo.json')); a=[m['test_acc'] for m in d['models']]; print('$z', len(a), min(a), max(a))" >>$log; done
ls -la $OUT/* >>$log
