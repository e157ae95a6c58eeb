#!/usr/bin/env bash
# Qwen3-8B, SSOPD: GRPO + self-distillation from the shortest correct into the longest wrong completion
# (the recipe's defaults: lambda 1, pointwise clip 0.05, variance frontier weight).
# Base settings and knobs: common.sh; hardware and rationale: docs/reproduction.md.
MODEL_SIZE=8b
METHOD_ARGS=()
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
