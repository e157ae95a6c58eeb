# Shared base of the nine launch scripts qwen3_{1.7b,4b,8b}_{grpo,opsd,ssopd}.sh: sourced, not run.
#
# The caller sets MODEL_SIZE (1.7b | 4b | 8b) and METHOD_ARGS (the only lines in which GRPO, OPSD and SSOPD differ),
# then sources this file, which builds verl's Hydra overrides and runs
#     python -m verl.trainer.main_ppo +recipe=ssopd <base overrides> <METHOD_ARGS> "$@"
# so any override on the command line wins (e.g. `bash qwen3_8b_ssopd.sh trainer.total_training_steps=10`).
#
# Knobs (environment variables; defaults in brackets):
#   MODEL_PATH        HF id or local path (an existing relative path is made absolute)  [Qwen/Qwen3-<size>]
#   DATA_DIR          where scripts/prepare_data.py wrote     [~/data/ssopd]
#   TRAIN_FILES       training parquet(s), Hydra list syntax  [$DATA_DIR/openthoughts_math/train.parquet]
#   VAL_FILES         validation parquet(s)                   [AIME24, AIME25, HMMT25 Feb under $DATA_DIR/eval]
#   NNODES, N_GPUS_PER_NODE                                   [per size, see below; 8]
#   PROJECT_NAME, EXPERIMENT_NAME                             [ssopd, <script name>]
#   CKPT_ROOT         checkpoints go to $CKPT_ROOT/<project>/<experiment>   [$PWD/checkpoints]
#   LOG_DIR           verl `file` logger root (JSONL of metrics for scripts/report.py)  [$PWD/logs]
#                     DATA_DIR, CKPT_ROOT and LOG_DIR are made absolute against the directory the script is run
#                     from ($PWD) and printed: they are written and read by Ray workers, which on a multi-node
#                     cluster run on other machines in other working directories.
#   LOGGER            trainer.logger                          ['console','file']
#   TRAIN_BATCH_SIZE [128] ROLLOUT_N [8] MAX_PROMPT_LENGTH [1024] MAX_RESPONSE_LENGTH [16384] LR [1e-6]
#   PPO_MINI_BATCH_SIZE [32] TOTAL_STEPS [300] SAVE_FREQ [50] TEST_FREQ [25] VAL_N [4]
#   ROLLOUT_TP, GPU_MEMORY_UTILIZATION, PPO_MAX_TOKEN_LEN, OFFLOAD  [per size, see below]
#   PYTHON            interpreter                             [python3]
#   SETUP             reported | full                         [reported]
#                     reported: the paper's training setup as a secondary summary reports it (SSOPD_SPEC.md 1b):
#                       LoRA r=64, alpha=128 on q/k/v/o/gate/up/down (as the OPSD reference code), LR 2e-5,
#                       ssopd.teacher=initial (base model, adapters off), ssopd.lambda=0.5,
#                       ssopd.max_distill_tokens=2048, validation top-p 0.95.
#                     full: full fine-tuning with the live self-teacher over every target token, lambda 1 (the
#                       recipe's defaults), LR 1e-6, validation top-p 1.0.
#                     Both apply to all three methods alike, so that GRPO, OPSD and SSOPD differ only in METHOD_ARGS.
#   LORA_RANK [64] LORA_ALPHA [128] DISTILL_TOKENS [2048]    (SETUP=reported only)
#   DRY_RUN=1 (or --dry-run as the first argument): append `--cfg job`: verl composes and prints the config, and
#                     nothing runs (no GPU, model or data needed).
#   DRY_RUN=args      print the Hydra overrides, one per line, and run nothing (what the tests compose in-process)
#   CPU_SMOKE=1       run the script for real on a CPU machine, shrunk: what cannot run there is substituted and
#                     every other override of the script is passed as written (docs/reproduction.md lists them):
#                       model and data -> the embedded tiny default (${ssopd_tiny:...}); +platform=cpu (CPU
#                       platform, fp32, the transformers rollout `hf` instead of vLLM); GPUs -> 2 CPU ranks on
#                       1 node; sizes scaled down (batch 4 prompts x 8, mini-batch 1 prompt: the same 4 updates
#                       per step; prompt 64 + response 48 tokens; the token budget PPO_MAX_TOKEN_LEN in the same
#                       ratio to prompt + response as the script's; DISTILL_TOKENS 16; 8 validation problems, VAL_N 1);
#                       1 training step, no checkpoint, no in-training validation besides the one before training.
#                     Any knob set in the environment still wins.
#
# Multi-node: start Ray yourself, then run the script on the head node with NNODES set; verl's `ray.init()` joins
# the running cluster:   head:    ray start --head --port=6379
#                        workers: ray start --address=<head-ip>:6379
# (ssopd-verl and the data must be installed/readable on every node; LOG_DIR and CKPT_ROOT on a filesystem shared
# by all nodes, at the same absolute path: any node may host the process that writes them.)
# See docs/reproduction.md for the hardware estimates and why each setting has its value.

set -euo pipefail

if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi

: "${MODEL_SIZE:?the launch script must set MODEL_SIZE}"
declare -p METHOD_ARGS >/dev/null 2>&1 || { echo "the launch script must set METHOD_ARGS" >&2; exit 2; }

# Per-size settings [our choice; the paper does not state its training hardware or parallelism]:
#   rollout tensor parallel, vLLM memory share, dynamic-batch token budget per GPU, FSDP offload, default nodes.
case "$MODEL_SIZE" in
    1.7b) size_model=Qwen/Qwen3-1.7B size_nnodes=1 size_tp=1 size_gpu_util=0.6 size_max_tok=24576 size_offload=False ;;
    4b)   size_model=Qwen/Qwen3-4B size_nnodes=1 size_tp=2 size_gpu_util=0.6 size_max_tok=20480 size_offload=False ;;
    8b)   size_model=Qwen/Qwen3-8B size_nnodes=2 size_tp=2 size_gpu_util=0.5 size_max_tok=17408 size_offload=True ;;
    *) echo "unknown MODEL_SIZE=$MODEL_SIZE (1.7b | 4b | 8b)" >&2; exit 2 ;;
esac

# CPU_SMOKE=1: the substitutions for a CPU machine (above). Knobs already in the environment win.
smoke_args=()
if [[ "${CPU_SMOKE:-0}" == "1" ]]; then
    # the script's token budget per GPU, in the same ratio to prompt + response (1024 + 16384) as on GPU
    size_max_tok=$(( size_max_tok * (64 + 48) / (1024 + 16384) ))
    size_nnodes=1
    : "${MODEL_PATH:=\${ssopd_tiny:model_path\}}" "${TRAIN_FILES:=\${ssopd_tiny:train_file\}}"
    : "${VAL_FILES:=\${ssopd_tiny:val_file\}}" "${N_GPUS_PER_NODE:=2}" "${TRAIN_BATCH_SIZE:=4}"
    : "${PPO_MINI_BATCH_SIZE:=1}" "${MAX_PROMPT_LENGTH:=64}" "${MAX_RESPONSE_LENGTH:=48}" "${TOTAL_STEPS:=1}"
    : "${SAVE_FREQ:=-1}" "${TEST_FREQ:=-1}" "${DISTILL_TOKENS:=16}" "${ROLLOUT_NAME:=hf}" "${VAL_N:=1}"
    smoke_args=(+platform=cpu data.val_max_samples=8)
fi

SCRIPT_NAME=$(basename "$0" .sh)
PYTHON=${PYTHON:-python3}
# A path the Ray workers open, made absolute against the directory the script is run from: a worker resolves a
# relative path against its own working directory, which on another node of a cluster is not this one.
absolute() { if [[ "$1" == /* ]]; then printf '%s' "$1"; else printf '%s' "$PWD/${1#./}"; fi; }
MODEL_PATH=${MODEL_PATH:-$size_model}
# an HF id ("Qwen/Qwen3-8B") looks like a relative path: only a local directory that exists is resolved
if [[ -e "$MODEL_PATH" ]]; then MODEL_PATH=$(absolute "$MODEL_PATH"); fi
DATA_DIR=$(absolute "${DATA_DIR:-$HOME/data/ssopd}")
# One training set for all three methods, so that they differ only in the ssopd.* lines. It must carry reference
# solutions (extra_info.solution) for the OPSD baseline; DAPO-Math-17k has none (fine for GRPO/SSOPD only).
TRAIN_FILES=${TRAIN_FILES:-"['$DATA_DIR/openthoughts_math/train.parquet']"}
EVAL_DIR=$DATA_DIR/eval
VAL_FILES=${VAL_FILES:-"['$EVAL_DIR/aime24.parquet','$EVAL_DIR/aime25.parquet','$EVAL_DIR/hmmt25_feb.parquet']"}
NNODES=${NNODES:-$size_nnodes}
N_GPUS_PER_NODE=${N_GPUS_PER_NODE:-8}
PROJECT_NAME=${PROJECT_NAME:-ssopd}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-$SCRIPT_NAME}
CKPT_ROOT=$(absolute "${CKPT_ROOT:-checkpoints}")
LOG_DIR=$(absolute "${LOG_DIR:-logs}")
LOGGER=${LOGGER:-"['console','file']"}

TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-128}        # prompts per step
ROLLOUT_N=${ROLLOUT_N:-8}                        # completions per prompt (the group)
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-1024}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-16384}
SETUP=${SETUP:-reported}
case "$SETUP" in
    reported) setup_lr=2e-5 setup_val_top_p=0.95 ;;
    full)     setup_lr=1e-6 setup_val_top_p=1.0 ;;
    *) echo "unknown SETUP=$SETUP (reported | full)" >&2; exit 2 ;;
esac
LR=${LR:-$setup_lr}
PPO_MINI_BATCH_SIZE=${PPO_MINI_BATCH_SIZE:-32}  # prompts per optimizer step: 128 / 32 = 4 updates per step
TOTAL_STEPS=${TOTAL_STEPS:-300}
SAVE_FREQ=${SAVE_FREQ:-50}
TEST_FREQ=${TEST_FREQ:-25}
VAL_N=${VAL_N:-4}                                # in-training validation samples (final numbers: scripts/evaluate.py)
ROLLOUT_NAME=${ROLLOUT_NAME:-vllm}
ROLLOUT_TP=${ROLLOUT_TP:-$size_tp}
GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-$size_gpu_util}
PPO_MAX_TOKEN_LEN=${PPO_MAX_TOKEN_LEN:-$size_max_tok}
OFFLOAD=${OFFLOAD:-$size_offload}

base_args=(
    +recipe=ssopd
    "${smoke_args[@]}"
    # data: one user turn ending in the boxed-answer instruction; Qwen3 thinking mode on (as in evaluation)
    data.train_files="$TRAIN_FILES"
    data.val_files="$VAL_FILES"
    data.train_batch_size="$TRAIN_BATCH_SIZE"
    data.max_prompt_length="$MAX_PROMPT_LENGTH"
    data.max_response_length="$MAX_RESPONSE_LENGTH"
    data.filter_overlong_prompts=True
    data.truncation=error
    +data.apply_chat_template_kwargs.enable_thinking=True
    # reward: last \boxed{} graded with math-verify, 1 / 0 (verl's default scorers do not use math-verify)
    reward.custom_reward_function.path=pkg://ssopd_verl.evaluation.grading
    reward.custom_reward_function.name=compute_score
    # model and actor: FSDP2, bf16 compute, gradient checkpointing, dynamic micro-batches by token count
    actor_rollout_ref.model.path="$MODEL_PATH"
    actor_rollout_ref.model.enable_gradient_checkpointing=True
    actor_rollout_ref.model.use_remove_padding=True
    actor_rollout_ref.actor.strategy=fsdp2
    actor_rollout_ref.ref.strategy=fsdp2
    actor_rollout_ref.actor.optim.lr="$LR"
    actor_rollout_ref.actor.optim.lr_warmup_steps=10
    actor_rollout_ref.actor.optim.weight_decay=0.0
    actor_rollout_ref.actor.ppo_mini_batch_size="$PPO_MINI_BATCH_SIZE"
    actor_rollout_ref.actor.use_dynamic_bsz=True
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu="$PPO_MAX_TOKEN_LEN"
    actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.actor.fsdp_config.param_offload="$OFFLOAD"
    actor_rollout_ref.actor.fsdp_config.optimizer_offload="$OFFLOAD"
    # rollout: vLLM, grouped sampling at temperature 1.0 (GRPO groups = SSOPD groups)
    actor_rollout_ref.rollout.name="$ROLLOUT_NAME"
    actor_rollout_ref.rollout.n="$ROLLOUT_N"
    actor_rollout_ref.rollout.temperature=1.0
    actor_rollout_ref.rollout.top_p=1.0
    actor_rollout_ref.rollout.tensor_model_parallel_size="$ROLLOUT_TP"
    actor_rollout_ref.rollout.gpu_memory_utilization="$GPU_MEMORY_UTILIZATION"
    actor_rollout_ref.rollout.val_kwargs.n="$VAL_N"
    actor_rollout_ref.rollout.val_kwargs.temperature=1.0
    actor_rollout_ref.rollout.val_kwargs.top_p="$setup_val_top_p"
    actor_rollout_ref.rollout.val_kwargs.do_sample=True
    # trainer
    trainer.project_name="$PROJECT_NAME"
    trainer.experiment_name="$EXPERIMENT_NAME"
    trainer.logger="$LOGGER"
    trainer.nnodes="$NNODES"
    trainer.n_gpus_per_node="$N_GPUS_PER_NODE"
    trainer.total_training_steps="$TOTAL_STEPS"
    trainer.save_freq="$SAVE_FREQ"
    trainer.test_freq="$TEST_FREQ"
    trainer.val_before_train=True
    # a Hydra interpolation, so that the three methods' configs differ only in their ssopd.* lines and names
    trainer.default_local_dir="$CKPT_ROOT/\${trainer.project_name}/\${trainer.experiment_name}"
    # verl's file logger writes $LOG_DIR/<project>/<experiment>.jsonl in whichever process tracks (Ray actor)
    ++ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_ROOT="$LOG_DIR"
)

# The reported setup [reported, SSOPD_SPEC.md 1b; LoRA shape and LR from the OPSD reference code; K our choice,
# OPSD's 2048-token completion length]. vLLM receives the adapters merged into the base weights each step
# (verl's lora.merge); the teacher runs the base model inside the actor's forward (adapters disabled).
setup_args=()
if [[ "$SETUP" == "reported" ]]; then
    setup_args=(
        actor_rollout_ref.model.lora_rank="${LORA_RANK:-64}"
        actor_rollout_ref.model.lora_alpha="${LORA_ALPHA:-128}"
        actor_rollout_ref.model.target_modules="[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
        actor_rollout_ref.model.lora.merge=True
        ssopd.teacher=initial
        ssopd.lambda=0.5
        ssopd.max_distill_tokens="${DISTILL_TOKENS:-2048}"
    )
fi

cmd=("$PYTHON" -m verl.trainer.main_ppo "${base_args[@]}" "${setup_args[@]}" "${METHOD_ARGS[@]}" "$@")
# where the outputs go, on stderr (DRY_RUN=args prints only the overrides on stdout); an override of
# trainer.default_local_dir or of VERL_FILE_LOGGER_ROOT on the command line wins over these
echo "checkpoints: $CKPT_ROOT/$PROJECT_NAME/$EXPERIMENT_NAME" >&2
echo "metrics:     $LOG_DIR/$PROJECT_NAME/$EXPERIMENT_NAME.jsonl" >&2
if [[ "${DRY_RUN:-0}" == "args" ]]; then
    printf '%s\n' "${cmd[@]:3}"
    exit 0
elif [[ "${DRY_RUN:-0}" == "1" ]]; then
    cmd+=(--cfg job)
else
    mkdir -p "$LOG_DIR"
    echo "+ ${cmd[*]}" >&2
fi
exec "${cmd[@]}"
