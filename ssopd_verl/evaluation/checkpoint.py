"""What gets evaluated: a model path, a Hugging Face hub id or a verl checkpoint, resolved to the exact weights the
backend loads (:func:`resolve_model`), with a record of what they are (:class:`EvaluatedModel`).

Layouts recognised (anything else is refused with the layout found, never evaluated as something else):

* a Hugging Face model directory (``config.json`` and ``*.safetensors`` / ``pytorch_model*.bin``): as is;
* a hub id (``org/name``, not a local path): as is, not hashed (the backend downloads it);
* a verl FSDP checkpoint, ``global_step_N`` or its ``actor/`` (``fsdp_config.json``, one shard per rank): merged
  to a Hugging Face model with verl's own merger (``python -m verl.model_merger merge --backend fsdp``, which
  gathers the shards of every rank);
* a LoRA actor's checkpoint: verl's merger writes the *base* weights as the Hugging Face model and the adapters
  beside them in ``lora_adapter/`` (``adapter_config.json``, ``adapter_model.safetensors``). Evaluating that model
  as it stands evaluates the untrained base model, so the adapters are merged into the base weights
  (``W + (lora_alpha / r) B A``, peft's ``merge_and_unload``) and the merged model is what the backend loads. A
  merger output passed directly (a model directory with ``lora_adapter/``) is merged the same way. An adapter
  with ``lora_alpha`` 0 (verl's merger falls back to 0 when the checkpoint lacks its LoRA metadata) would merge to
  the base model: refused.

The record (:meth:`EvaluatedModel.as_dict`) goes into ``run_config.json`` and ``summary.md``: the path given, the
kind, the training step, the number of ranks that saved it, whether adapters were merged, the directory loaded
and the sha256 of its weight files (so two evaluations can be checked to have loaded the same weights).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
LORA_DIR = "lora_adapter"
SOURCE_FILE = "ssopd_source.json"  # in a merged directory: what it was made from (reused only for the same source)
_STEP = re.compile(r"global_step_(\d+)$")


class UnrecognisedModel(ValueError):
    """A --model that is none of the layouts above."""


@dataclass(frozen=True)
class EvaluatedModel:
    source: str  # what the user passed
    kind: str  # "hf" | "hub" | "verl_fsdp"
    path: str  # the directory (or hub id) the backend loads
    step: Optional[int] = None  # global_step_N of a verl checkpoint
    world_size: Optional[int] = None  # ranks that saved a verl checkpoint
    lora_merged: bool = False  # LoRA adapters merged into the base weights
    lora: Optional[dict] = None  # the adapters' r, lora_alpha, target_modules
    weights_sha256: Optional[str] = None  # of the weight files in `path` (None for a hub id)

    def as_dict(self) -> dict:
        return asdict(self)


def weight_files(model_dir: Path) -> list[Path]:
    return sorted({p for pattern in WEIGHT_PATTERNS for p in Path(model_dir).glob(pattern)})


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the weight files' names and bytes, in name order (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    for path in weight_files(model_dir):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _verl_actor_dir(path: Path) -> Optional[Path]:
    for candidate in (path / "actor", path):
        if (candidate / "fsdp_config.json").exists():
            return candidate
    return None


def _is_hf_model(path: Path) -> bool:
    return (path / "config.json").exists() and bool(weight_files(path))


def _step_of(path: Path) -> Optional[int]:
    for part in (path, path.parent):
        match = _STEP.search(part.name)
        if match:
            return int(match.group(1))
    return None


def _describe(path: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "") or "empty"


def _reuse(target: Path, source: dict) -> bool:
    """A merged directory made earlier from the same source (same files, same sizes and times) is reused."""
    marker = target / SOURCE_FILE
    return _is_hf_model(target) and marker.exists() and json.loads(marker.read_text()) == source


def _source_stamp(directory: Path) -> dict:
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    return {"dir": str(directory.resolve()),
            "files": [[str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}  # fmt: skip


def read_lora_config(lora_dir: Path) -> dict:
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not r or not alpha:
        raise UnrecognisedModel(
            f"{lora_dir}: LoRA adapter with r={r}, lora_alpha={alpha}: merging it would give the base model "
            "(verl's merger writes lora_alpha 0 when the checkpoint lacks lora_train_meta.json); set lora_alpha in "
            "adapter_config.json to the training's actor_rollout_ref.model.lora_alpha"
        )
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(config.get("target_modules") or [])}


def merge_lora(base_dir: Path, lora_dir: Path, target: Path) -> None:
    """Base model + adapters -> one Hugging Face model in ``target`` (peft's merge_and_unload), in the base
    weights' dtype, with the base directory's tokenizer and generation config."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    merged = PeftModel.from_pretrained(base, lora_dir).merge_and_unload()
    if any("lora_" in name for name, _ in merged.named_parameters()):
        raise RuntimeError(f"merging {lora_dir} left LoRA parameters in the model")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _merge_verl_checkpoint(actor: Path, target: Path, log) -> None:
    cmd = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp",
           "--local_dir", str(actor), "--target_dir", str(target)]  # fmt: skip
    log("merging the verl checkpoint: " + " ".join(cmd))
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(cmd, check=True)


def resolve_model(model: str, out: Path, log=print) -> EvaluatedModel:
    """The weights to evaluate for ``--model`` (see the module docstring); merged models are written under
    ``out`` (``merged_hf_model/``: verl's merger output; ``merged_lora_model/``: base + adapters) and reused by a
    resumed run when made from the same files."""
    out = Path(out)
    path = Path(model).expanduser()
    if not path.exists():
        return EvaluatedModel(source=model, kind="hub", path=model)
    if not path.is_dir():
        raise UnrecognisedModel(f"--model {model}: a file, not a model directory or a verl checkpoint")

    kind, step, world_size, hf_dir = "hf", None, None, path
    actor = _verl_actor_dir(path)
    if actor is not None:
        kind, step = "verl_fsdp", _step_of(actor)
        world_size = json.loads((actor / "fsdp_config.json").read_text()).get("world_size")
        hf_dir = out / "merged_hf_model"
        stamp = _source_stamp(actor)
        if not _reuse(hf_dir, stamp):
            _merge_verl_checkpoint(actor, hf_dir, log)
            (hf_dir / SOURCE_FILE).write_text(json.dumps(stamp))
    elif not _is_hf_model(path):
        adapter_only = (path / "adapter_config.json").exists()
        raise UnrecognisedModel(
            f"--model {model}: not a layout this script evaluates ({_describe(path)}). Expected a Hugging Face model "
            "(config.json + *.safetensors), a verl FSDP checkpoint (global_step_N, or its actor/ with "
            "fsdp_config.json) or verl's merger output"
            + (". This is a LoRA adapter alone: pass the verl checkpoint it was saved with, or merge it into its "
               "base model first" if adapter_only else "")  # fmt: skip
        )

    lora, loaded = None, hf_dir
    if (hf_dir / LORA_DIR).exists():
        lora = read_lora_config(hf_dir / LORA_DIR)
        loaded = out / "merged_lora_model"
        stamp = _source_stamp(hf_dir)
        if not _reuse(loaded, stamp):
            log(f"merging the LoRA adapters of {hf_dir / LORA_DIR} (r={lora['r']}, alpha={lora['lora_alpha']}) into "
                f"the base weights: {loaded}")
            merge_lora(hf_dir, hf_dir / LORA_DIR, loaded)
            (loaded / SOURCE_FILE).write_text(json.dumps(stamp))
    if not _is_hf_model(loaded):
        raise UnrecognisedModel(f"{loaded}: no config.json and weight files after merging ({_describe(loaded)})")
    return EvaluatedModel(source=model, kind=kind, path=str(loaded), step=step, world_size=world_size,
                          lora_merged=lora is not None, lora=lora, weights_sha256=weights_sha256(loaded))  # fmt: skip


def describe_evaluated(evaluated: "EvaluatedModel | dict") -> str:
    """One line: what the backend loads and where it came from."""
    e = evaluated.as_dict() if isinstance(evaluated, EvaluatedModel) else evaluated
    if e["kind"] == "hub":
        return f"hub model `{e['source']}` (downloaded by the backend; weights not hashed)"
    parts = [f"`{e['path']}`"]
    if e["kind"] == "verl_fsdp":
        parts.append(f"merged from the verl checkpoint `{e['source']}` (step {e['step']}, saved by "
                     f"{e['world_size']} rank{'s' if e['world_size'] != 1 else ''})")
    if e["lora_merged"]:
        lora = e["lora"]
        parts.append(f"LoRA adapters merged (r={lora['r']}, alpha={lora['lora_alpha']})")
    elif e["kind"] == "verl_fsdp":
        parts.append("no LoRA adapters")
    parts.append(f"weights sha256 {e['weights_sha256'][:16]}")
    return ", ".join(parts)
