"""What scripts/evaluate.py evaluates (ssopd_verl.evaluation.checkpoint): exactly the weights that were trained.

A LoRA actor's checkpoint, merged by verl's model merger, is the base model plus ``lora_adapter/``: the adapters
must be merged into the evaluated weights (before, the base model was evaluated and nothing said so). Layouts the
script does not know are refused. Built here on the tiny default (a 2.6 MB Qwen3) with peft's adapter format, the
one verl's merger writes; the real verl checkpoints (LoRA on two ranks, full fine-tuning on one) go through the
same code in the end-to-end kit test (tests/test_e2e_cpu.py::test_evaluate_scores_the_trained_checkpoint_as_the_
trainer_did).
"""

import json
import shutil

import pytest
import torch

from ssopd_verl.evaluation import runner
from ssopd_verl.evaluation.benchmarks import load_benchmark
from ssopd_verl.evaluation.checkpoint import UnrecognisedModel, resolve_model, weights_sha256
from ssopd_verl.evaluation.generate import build_prompt

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny():
    from ssopd_verl.tiny_default import get_tiny_default

    return get_tiny_default()


@pytest.fixture(scope="module")
def lora_layout(tiny, tmp_path_factory):
    """verl's merger output for a LoRA actor: the base weights as the HF model, the adapters in lora_adapter/;
    with the logits of the adapted model (the one that was trained) and of the base model on one prompt."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("lora") / "merged_hf_model"
    base = AutoModelForCausalLM.from_pretrained(tiny.model_path, dtype=torch.float32)
    base.save_pretrained(root)
    tokenizer = AutoTokenizer.from_pretrained(tiny.model_path)
    tokenizer.save_pretrained(root)
    ids = tokenizer("What is 12 + 34? Please reason step by step", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base_logits = base(ids).logits
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:  # B = 0 at init: a trained adapter has moved it
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        adapted_logits = adapted(ids).logits
    adapted.save_pretrained(root / "lora_adapter")
    return root, ids, adapted_logits, base_logits


def _logits(path, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(ids).logits


def test_lora_adapters_are_merged_into_the_evaluated_weights(lora_layout, tmp_path):
    root, ids, adapted, base = lora_layout
    assert (adapted - base).abs().max() > 1e-2  # the adapters matter: the check can tell the two models apart
    evaluated = resolve_model(str(root), tmp_path, log=lambda *_: None)
    assert evaluated.lora_merged and evaluated.kind == "hf"
    assert evaluated.lora == {"r": 4, "lora_alpha": 8, "target_modules": sorted(TARGETS)}
    assert evaluated.path == str(tmp_path / "merged_lora_model")
    torch.testing.assert_close(_logits(evaluated.path, ids), adapted, rtol=1e-5, atol=1e-5)
    assert evaluated.weights_sha256 == weights_sha256(tmp_path / "merged_lora_model")
    assert evaluated.weights_sha256 != weights_sha256(root)  # not the base model's weights


def test_a_resumed_evaluation_reuses_the_merge_and_a_changed_adapter_is_merged_again(lora_layout, tmp_path):
    root, ids, adapted, _ = lora_layout
    source = tmp_path / "src"
    shutil.copytree(root, source)
    first = resolve_model(str(source), tmp_path / "out", log=lambda *_: None)
    weights = next((tmp_path / "out" / "merged_lora_model").glob("*.safetensors"))
    mtime = weights.stat().st_mtime_ns
    assert resolve_model(str(source), tmp_path / "out", log=lambda *_: None) == first
    assert weights.stat().st_mtime_ns == mtime  # reused, not merged again
    # another adapter in the same place (a later step's, say): merged again, other weights, refused by a resume
    from safetensors.torch import load_file, save_file

    tensors = load_file(source / "lora_adapter" / "adapter_model.safetensors")
    save_file({k: v * 2 if "lora_B" in k else v for k, v in tensors.items()},
              source / "lora_adapter" / "adapter_model.safetensors")  # fmt: skip
    second = resolve_model(str(source), tmp_path / "out", log=lambda *_: None)
    assert second.weights_sha256 != first.weights_sha256
    out = tmp_path / "resume"
    runner.check_run_config(out, {"model": str(source), "evaluated": first.as_dict()})
    with pytest.raises(SystemExit, match="weights_sha256"):
        runner.check_run_config(out, {"model": str(source), "evaluated": second.as_dict()})


def test_a_plain_model_is_evaluated_as_it_is(tiny, tmp_path):
    evaluated = resolve_model(tiny.model_path, tmp_path, log=lambda *_: None)
    assert (evaluated.kind, evaluated.path, evaluated.lora_merged) == ("hf", tiny.model_path, False)
    assert evaluated.weights_sha256 == weights_sha256(tiny.model_path)
    hub = resolve_model("Qwen/Qwen3-8B", tmp_path, log=lambda *_: None)
    assert (hub.kind, hub.path, hub.weights_sha256) == ("hub", "Qwen/Qwen3-8B", None)


def test_an_adapter_with_lora_alpha_zero_is_refused(lora_layout, tmp_path):
    """verl's merger writes lora_alpha 0 when the checkpoint lacks its LoRA metadata: merged, that is the base."""
    source = tmp_path / "src"
    shutil.copytree(lora_layout[0], source)
    config = json.loads((source / "lora_adapter" / "adapter_config.json").read_text())
    (source / "lora_adapter" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 0}))
    with pytest.raises(UnrecognisedModel, match="lora_alpha=0"):
        resolve_model(str(source), tmp_path / "out")


def test_unknown_layouts_are_refused_never_evaluated_as_something_else(lora_layout, tmp_path):
    adapter_only = tmp_path / "adapter"
    shutil.copytree(lora_layout[0] / "lora_adapter", adapter_only)
    with pytest.raises(UnrecognisedModel, match="a LoRA adapter alone"):
        resolve_model(str(adapter_only), tmp_path / "out")
    step = tmp_path / "global_step_7"
    (step / "actor" / "huggingface").mkdir(parents=True)  # a checkpoint without its shards' fsdp_config.json
    (step / "actor" / "huggingface" / "config.json").write_text("{}")
    with pytest.raises(UnrecognisedModel, match=r"not a layout this script evaluates \(actor/\)"):
        resolve_model(str(step), tmp_path / "out")
    weightless = tmp_path / "config_only"
    weightless.mkdir()
    (weightless / "config.json").write_text("{}")
    with pytest.raises(UnrecognisedModel, match="config.json"):
        resolve_model(str(weightless), tmp_path / "out")
    with pytest.raises(UnrecognisedModel, match="a file"):
        resolve_model(str(weightless / "config.json"), tmp_path / "out")


def test_the_cli_refuses_an_unknown_layout_in_one_line(tmp_path, capsys):
    import runpy

    (tmp_path / "empty").mkdir()
    argv = ["evaluate.py", "--model", str(tmp_path / "empty"), "--benchmarks", "aime24", "--limit", "1",
            "--out", str(tmp_path / "out")]  # fmt: skip
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", argv)
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(script), run_name="__main__")
    assert "evaluate.py: error:" in str(exit_info.value) and "not a layout this script evaluates (empty)" in str(
        exit_info.value)
    assert not (tmp_path / "out" / "aime24.jsonl").exists()


def test_a_verl_parquet_is_evaluated_on_the_trainers_own_prompts(tiny):
    """--benchmarks <val.parquet>: the rows' chat messages rendered as verl renders them (apply_chat_template with
    the generation prompt; the tiny default's chat-template kwargs are Qwen3's defaults, thinking on)."""
    import pandas as pd
    from transformers import AutoTokenizer

    name, problems = load_benchmark(tiny.val_file)
    frame = pd.read_parquet(tiny.val_file)
    assert name == "val" and len(problems) == len(frame) == 128
    tokenizer = AutoTokenizer.from_pretrained(tiny.model_path)
    for problem, (_, row) in zip(problems, frame.iterrows()):
        messages = [dict(m) for m in row["prompt"]]
        assert problem["answer"] == row["reward_model"]["ground_truth"]
        verl = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert build_prompt(tokenizer, problem["messages"], enable_thinking=True) == verl
