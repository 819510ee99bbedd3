#!/bin/sh
# Train on one or more devices (ModelZoo forms):
#   sh scripts/run_train.sh Ascend DEVICE_NUM VISIBLE_DEVICES RANK_TABLE_FILE DATASET_PATH [CKPT_PATH FREEZE_LAYER [FILTER_HEAD]] [--key value ...]
#   sh scripts/run_train.sh GPU DEVICE_NUM VISIBLE_DEVICES DATASET_PATH [CKPT_PATH FREEZE_LAYER [FILTER_HEAD]] [--key value ...]
#   sh scripts/run_train.sh CPU [DEVICE_NUM] DATASET_PATH [CKPT_PATH FREEZE_LAYER [FILTER_HEAD]] [--key value ...]
# Trailing --key value pairs go to train.py unchanged. DRY_RUN=1 prints each rank's environment and command.
# Runs in the foreground, waits for every rank, and exits non-zero if any rank fails.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec python -m src.launch "$@"
