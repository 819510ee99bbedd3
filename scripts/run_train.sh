#!/bin/sh
# Train on one CPU: sh scripts/run_train.sh CPU DATASET_PATH [--key value ...]
# Extra --key value pairs go to train.py unchanged (e.g. --config_path configs/resnet50_cifar10.yaml).
# The log is written to OUTPUT_PATH/train.log by train.py itself; this script runs in the foreground
# and exits with train.py's exit code.
usage() {
    echo "usage: sh scripts/run_train.sh CPU DATASET_PATH [--key value ...]" >&2
    exit 2
}
[ $# -ge 2 ] || usage
PLATFORM=$1
DATASET_PATH=$2
shift 2
case "$PLATFORM" in
    CPU) ;;
    *) echo "error: platform '$PLATFORM' is not supported by this script (use CPU; for GPU/Ascend run" \
            "python train.py --platform $PLATFORM --dataset_path ...)" >&2; exit 2 ;;
esac
[ -d "$DATASET_PATH" ] || { echo "error: DATASET_PATH $DATASET_PATH does not exist (pass the dataset folder)" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
exec python "$ROOT/train.py" --platform "$PLATFORM" --dataset_path "$DATASET_PATH" "$@"
