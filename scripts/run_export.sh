#!/bin/sh
# Export a checkpoint: sh scripts/run_export.sh CKPT_FILE MINDIR|ONNX|AIR [--key value ...]
# AIR needs an Ascend machine (add --platform Ascend). Extra pairs go to export.py (e.g. --config_path, --file_name).
usage() {
    echo "usage: sh scripts/run_export.sh CKPT_FILE MINDIR|ONNX|AIR [--key value ...]" >&2
    exit 2
}
[ $# -ge 2 ] || usage
CKPT_FILE=$1
FILE_FORMAT=$2
shift 2
case "$FILE_FORMAT" in
    MINDIR|ONNX|AIR) ;;
    *) echo "error: file format '$FILE_FORMAT' is not one of MINDIR, ONNX, AIR" >&2; exit 2 ;;
esac
case "$CKPT_FILE" in
    http://*|https://*|mindcv:*|torchvision:*) ;;  # published weights: export.py downloads them into its cache
    *) [ -f "$CKPT_FILE" ] || { echo "error: CKPT_FILE $CKPT_FILE not found (pass a checkpoint file, a URL or a short name such as mindcv:resnet50)" >&2; exit 2; } ;;
esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
exec python "$ROOT/export.py" --ckpt_file "$CKPT_FILE" --file_format "$FILE_FORMAT" "$@"
