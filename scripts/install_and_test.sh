#!/usr/bin/env bash
# The README's test command: install into .venv, check that each test file stands alone, then run the whole test
# suite. CI (.ci/run) calls exactly this.
#
# Then the numerics-sensitive tests a second time as another machine would run them: under AVX2 kernels
# (ATEN_CPU_CAPABILITY for torch's own kernels, MKL_ENABLE_INSTRUCTIONS for MKL's matmuls), where floats round
# differently than under the AVX-512 kernels of most CI hosts: the loss numerics against their float64
# references, and the accuracies measured on the shipped tiny default. ~1-2 min. The script fails if either run
# fails (or collects no test, pytest's exit 5; a test named here that no longer exists is pytest's exit 4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# every test file is collected and its fixtures resolve when it runs alone (pytest --setup-plan per file, ~30 s)
.venv/bin/python tests/check_isolation.py
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
tiny=tests/test_tiny_default.py
numerics=(
    tests/test_losses.py
    "$tiny::test_instruction_set_setting_is_in_effect"
    "$tiny::test_shipped_files_match_their_manifest"
    "$tiny::test_shipped_heldout_measurement_is_reproduced"
    "$tiny::test_sampled_groups_are_mixed"
    "$tiny::test_own_sampler_matches_band"
    "$tiny::test_teacher_prompt_beats_student_prompt"
    "$tiny::test_teacher_prompt_is_the_trainers_with_a_sampled_witness"
)
echo "the numerics tests again under ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2"
second=0
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 .venv/bin/python -m pytest -q "${numerics[@]}" || second=$?
if [ "$status" -ne 0 ] || [ "$second" -ne 0 ]; then
    echo "tests failed: the suite exited $status, the AVX2 run $second"
    exit 1
fi
