#!/usr/bin/env bash
# Qwen3-8B, GRPO baseline: the SSOPD recipe with the distillation term off (same code path, lambda = 0).
# Base settings and knobs: common.sh; hardware and rationale: docs/reproduction.md.
MODEL_SIZE=8b
METHOD_ARGS=(ssopd.lambda=0)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
