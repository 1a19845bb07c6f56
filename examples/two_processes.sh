#!/usr/bin/env bash
# A 2-process data-parallel launch of any config (here the tiny smoke config), through accelerate.
# On one machine without GPUs the two processes train on the CPU (gloo); with GPUs, one per GPU.
# `mmdistill train` alone does the same when accelerate's default config asks for 2 processes.
set -euo pipefail
accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 \
  -m mmdistill train "${1:-tiny}" train.output_dir="${2:-runs/two_processes}" "${@:3}"
