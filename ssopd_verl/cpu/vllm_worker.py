"""The vLLM worker extension for CPU: verl's weight sync into a model that vLLM's CPU backend has repacked.

verl's ``vLLMColocateWorkerExtension.update_weights_from_ipc`` (verl 0.9.1,
``verl/workers/rollout/vllm_rollout/utils.py``) loads the actor's weights with ``model.load_weights`` into the
running model, then calls ``process_weights_after_loading`` again. That assumes the kernels read the parameters
that ``load_weights`` writes, true of vLLM's CUDA linear layers. On CPU it is not: after loading, vLLM's
``UnquantizedLinearMethod.process_weights_after_loading`` (``dispatch_cpu_unquantized_gemm(layer,
remove_weight=True)``) packs each linear weight into a oneDNN / sgl-kernel handle and replaces ``layer.weight``
with an empty parameter that has no ``weight_loader``: verl's reload fails (``AttributeError: 'Parameter' object
has no attribute 'weight_loader'``), and a second ``process_weights_after_loading`` would find nothing to repack.

:class:`CPUWorkerExtension` loads the same stream the way vLLM reloads weights itself (``reload_weights``, its
weight-transfer engines): ``initialize_layerwise_reload`` puts every layer back into its load-time form,
``load_weights`` fills it, and each layer is re-processed (repacked) once all its weights have arrived;
``finalize_layerwise_reload`` processes the rest. The received tensors are copied out of the shared-memory bucket
first: the layerwise loader keeps them until a layer is complete, and the sender reuses the bucket. One case that
reload leaves stale (its documented limitation for tied parameters): a tied ``lm_head`` (Qwen3 with
``tie_word_embeddings``, the tiny default) shares ``embed_tokens.weight`` but receives no weight of its own, so its
packed copy for the logits is never rebuilt and vLLM would sample from the old weights (near-uniform log-probs after
the first sync from ``load_format=dummy``). Every embedding layer is therefore re-processed at the end; an
embedding keeps its weight (``remove_weight=False``), so that is safe to repeat.

Selected by the ``+platform=cpu`` overlay through ``rollout.engine_kwargs.vllm.worker_extension_cls``, which verl
passes to ``vllm serve`` after its own default (an option, not a patch). This module runs in vLLM's worker
process only; it imports vLLM.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightReceiver
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

__all__ = ["CPUWorkerExtension"]


class CPUWorkerExtension(vLLMColocateWorkerExtension):
    """verl's worker extension, with full-weight updates through vLLM's layerwise reload (module docstring)."""

    def update_weights_from_ipc(self, peft_config: dict = None, base_sync_done=False, use_shm: bool = False):
        if peft_config is not None:
            raise NotImplementedError(
                "vLLM on CPU takes full weights only: set actor_rollout_ref.model.lora.merge=True for LoRA"
            )
        if not use_shm:
            raise RuntimeError("vLLM on CPU receives weights through shared memory (the CPU platform has no IPC)")
        model = self.model_runner.model
        receiver = BucketedWeightReceiver(zmq_handle=self._get_zmq_handle(), device=torch.device("cpu"), use_shm=True)

        def on_bucket_received(weights: list[tuple[str, torch.Tensor]], is_last: bool) -> None:
            owned = [(name, tensor.clone()) for name, tensor in weights]  # out of the reused shared-memory bucket
            self._update_weights(owned, peft_config=None, base_sync_done=base_sync_done)

        initialize_layerwise_reload(model)
        receiver.receive_weights(on_bucket_received=on_bucket_received)
        finalize_layerwise_reload(model, self.model_runner.vllm_config.model_config)
        for module in model.modules():  # tied lm_head: repack from the shared, now updated, weight
            if isinstance(module, VocabParallelEmbedding):
                module.quant_method.process_weights_after_loading(module)
