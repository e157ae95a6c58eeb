#!/usr/bin/env bash
# Qwen3-4B, solution-conditioned OPSD baseline: the teacher's witness is the dataset's reference solution
# (extra_info.solution) instead of the group's shortest correct completion.
# Base settings and knobs: common.sh; hardware and rationale: docs/reproduction.md.
MODEL_SIZE=4b
METHOD_ARGS=(ssopd.witness_source=reference_solution)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
