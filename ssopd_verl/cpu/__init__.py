"""A CPU backend for verl 0.9.1, used by the embedded tiny default and the tests; it is not part of SSOPD.

verl ships nothing that runs `python -m verl.trainer.main_ppo` on a machine without an accelerator. This
subpackage adds it through verl's extension points (no verl function is patched):

* `platform`: a CPU platform (`PlatformRegistry`), selected only with `VERL_PLATFORM=cpu`, and verl's FSDP engines
  registered for device "cpu" (`EngineRegistry`);
* `engine`: verl's real FSDP2 actor engine in one process, and the batches it consumes (tests, benchmarks);
* `rollout`: a rollout backend `hf` on transformers `generate` (vLLM is the production backend).

Nothing here imports SSOPD's glue (`ssopd_verl.glue`) or its algorithm; the glue's plugin registers this runtime,
and the `+platform=cpu` overlay (`ssopd_verl/conf/platform/cpu.yaml`) selects it.
"""
