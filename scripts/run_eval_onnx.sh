#!/bin/sh
# Evaluate an ONNX model with onnxruntime: sh scripts/run_eval_onnx.sh DATASET_PATH ONNX_FILE [--key value ...]
usage() {
    echo "usage: sh scripts/run_eval_onnx.sh DATASET_PATH ONNX_FILE [--key value ...]" >&2
    exit 2
}
[ $# -ge 2 ] || usage
DATASET_PATH=$1
ONNX_FILE=$2
shift 2
[ -d "$DATASET_PATH" ] || { echo "error: DATASET_PATH $DATASET_PATH does not exist (pass the dataset folder)" >&2; exit 2; }
[ -f "$ONNX_FILE" ] || { echo "error: ONNX_FILE $ONNX_FILE not found (export one with export.py --file_format ONNX)" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
exec python "$ROOT/eval_onnx.py" --dataset_path "$DATASET_PATH" --file_name "$ONNX_FILE" "$@"
