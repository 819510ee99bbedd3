#!/bin/sh
# Evaluate a checkpoint: sh scripts/run_eval.sh PLATFORM DATASET_PATH CHECKPOINT_PATH [--key value ...]
# Prints and appends to OUTPUT_PATH/eval.log: result:{'acc': A, 'top_5_accuracy': B} ckpt=PATH
usage() {
    echo "usage: sh scripts/run_eval.sh CPU|GPU|Ascend DATASET_PATH CHECKPOINT_PATH [--key value ...]" >&2
    exit 2
}
[ $# -ge 3 ] || usage
PLATFORM=$1
DATASET_PATH=$2
CHECKPOINT_PATH=$3
shift 3
case "$PLATFORM" in
    CPU|GPU|Ascend) ;;
    *) echo "error: platform '$PLATFORM' is not one of CPU, GPU, Ascend" >&2; exit 2 ;;
esac
[ -d "$DATASET_PATH" ] || { echo "error: DATASET_PATH $DATASET_PATH does not exist (pass the dataset folder)" >&2; exit 2; }
case "$CHECKPOINT_PATH" in
    http://*|https://*|mindcv:*|torchvision:*) ;;  # published weights: eval.py downloads them into its cache
    *) [ -f "$CHECKPOINT_PATH" ] || { echo "error: CHECKPOINT_PATH $CHECKPOINT_PATH not found (pass a checkpoint file, a URL or a short name such as mindcv:resnet50)" >&2; exit 2; } ;;
esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
exec python "$ROOT/eval.py" --platform "$PLATFORM" --dataset_path "$DATASET_PATH" \
    --pretrain_ckpt "$CHECKPOINT_PATH" "$@"
