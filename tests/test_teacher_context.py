import pytest

from ssopd_verl.teacher_context import (
    DEFAULT_TEMPLATE,
    TeacherContext,
    build_teacher_context,
    strip_thinking,
)
from ssopd_verl.tiny_tokenizer import QWEN3_SPECIAL_TOKENS, QWEN3_VOCAB_SIZE

PROBLEM = "Compute $\\frac{1}{2} + \\frac{1}{2}$. Put the final answer in \\boxed{}."
WITNESS = "<think>\nHalf plus half is one.\n</think>\n\nThe sum is \\boxed{1}."
MESSAGES = [{"role": "user", "content": PROBLEM}]
HEADER = "<|im_start|>assistant\n"


def _target(tok):
    # '龘' is two byte-level tokens; taking only the first gives ids that decode to U+FFFD, which re-encodes
    # to different ids: the teacher must still see these exact ids.
    return tok.encode("I think it is ", add_special_tokens=False) + tok.encode("龘")[:1] + tok.encode(" 2.<|im_end|>")


# ---------------------------------------------------------------- the offline Qwen3 tokenizer


def test_tokenizer_matches_qwen3(qwen_tokenizer):
    tok = qwen_tokenizer
    assert tok.encode("Hello world,") == [9707, 1879, 11]
    assert len(tok) == QWEN3_VOCAB_SIZE == 151669
    ids = tok.convert_tokens_to_ids([t for t, _ in QWEN3_SPECIAL_TOKENS])
    assert ids == list(range(151643, 151669))
    assert tok.convert_tokens_to_ids(["<|im_end|>", "<tool_call>", "<think>", "</think>"]) == [
        151645,
        151657,
        151667,
        151668,
    ]
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == (
        "<|im_end|>",
        151645,
        "<|endoftext|>",
        151643,
    )
    assert tok.encode("2024") == [17, 15, 17, 19]  # Qwen splits digits one by one
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_save_and_reload(tmp_path):
    from transformers import AutoTokenizer

    from ssopd_verl.tiny_tokenizer import save_qwen3_tokenizer

    tok = AutoTokenizer.from_pretrained(save_qwen3_tokenizer(tmp_path / "tok"))
    assert tok.encode("Hello world,") == [9707, 1879, 11]
    assert tok.convert_tokens_to_ids("</think>") == 151668
    assert tok.chat_template is not None


# ---------------------------------------------------------------- strip_thinking


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>\nreason\n</think>\n\nAnswer 4.", "Answer 4."),
        ("  <think>a</think> Answer <think>b</think> 4. ", "Answer  4."),
        ("reasoning that started in the prompt\n</think>\n\nAnswer 4.", "Answer 4."),
        ("<think>\nnever closed, \\boxed{4}", "<think>\nnever closed, \\boxed{4}"),  # unchanged
        ("No thinking at all.", "No thinking at all."),
        ("<think>only reasoning</think>", ""),
    ],
)
def test_strip_thinking(text, expected):
    assert strip_thinking(text) == expected


# ---------------------------------------------------------------- build_teacher_context


def test_target_ids_verbatim_and_prompt_length(qwen_tokenizer):
    tok = qwen_tokenizer
    target = _target(tok)
    assert tok.encode(tok.decode(target), add_special_tokens=False) != target  # really not round-trippable
    ctx = build_teacher_context(tok, MESSAGES, WITNESS, target)
    assert isinstance(ctx, TeacherContext)
    assert ctx.input_ids[ctx.prompt_length :] == target
    prompt_text = tok.decode(ctx.input_ids[: ctx.prompt_length])
    assert prompt_text.endswith(HEADER)
    assert prompt_text.count("<|im_start|>user\n") == 1
    expected = DEFAULT_TEMPLATE.replace("{problem}", PROBLEM).replace("{witness}", WITNESS)
    assert f"<|im_start|>user\n{expected}<|im_end|>\n" in prompt_text  # witness inside the template, problem too
    assert ctx.witness_tokens == len(tok.encode(WITNESS, add_special_tokens=False))
    assert not ctx.witness_truncated
    # prompt_length is exactly the rendered teacher prompt
    messages = [{"role": "user", "content": expected}]
    assert ctx.input_ids[: ctx.prompt_length] == tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )["input_ids"]


def test_accepts_tensor_target_and_does_not_mutate_messages(qwen_tokenizer):
    import torch
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROBLEM}]
    snapshot = [dict(m) for m in messages]
    target = _target(qwen_tokenizer)
    ctx = build_teacher_context(qwen_tokenizer, messages, WITNESS, torch.tensor(target))
    assert ctx.input_ids[ctx.prompt_length :] == target
    assert all(type(t) is int for t in ctx.input_ids)
    assert messages == snapshot
    assert qwen_tokenizer.decode(ctx.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_empty_witness_template_reproduces_student_prompt(qwen_tokenizer):
    tok = qwen_tokenizer
    student = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    ctx = build_teacher_context(tok, MESSAGES, "", [1, 2], template="{problem}{witness}")
    assert ctx.input_ids == student + [1, 2]
    assert ctx.prompt_length == len(student)


def test_only_last_user_message_replaced(qwen_tokenizer):
    messages = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": PROBLEM},
    ]
    ctx = build_teacher_context(qwen_tokenizer, messages, "W", [11])
    text = qwen_tokenizer.decode(ctx.input_ids)
    assert "<|im_start|>user\nfirst question<|im_end|>" in text
    assert text.count("Reference Solution Begin") == 1
    assert text.index("first answer") < text.index("Reference Solution Begin")


def test_enable_thinking_false_changes_header(qwen_tokenizer):
    tok = qwen_tokenizer
    on = build_teacher_context(tok, MESSAGES, WITNESS, [11])
    off = build_teacher_context(tok, MESSAGES, WITNESS, [11], chat_template_kwargs={"enable_thinking": False})
    assert tok.decode(on.input_ids[: on.prompt_length]).endswith(HEADER)
    assert tok.decode(off.input_ids[: off.prompt_length]).endswith(HEADER + "<think>\n\n</think>\n\n")
    assert off.prompt_length > on.prompt_length


def test_strip_mode_removes_thinking(qwen_tokenizer):
    tok = qwen_tokenizer
    keep = tok.decode(build_teacher_context(tok, MESSAGES, WITNESS, [11]).input_ids)
    strip = tok.decode(build_teacher_context(tok, MESSAGES, WITNESS, [11], witness_thinking="strip").input_ids)
    assert "Half plus half is one." in keep
    assert "Half plus half is one." not in strip and "<think>" not in strip
    assert "=== Reference Solution Begin ===\nThe sum is \\boxed{1}.\n=== Reference Solution End ===" in strip


def test_max_witness_tokens_cut(qwen_tokenizer):
    tok = qwen_tokenizer
    witness = " ".join(f"step{i}" for i in range(100))
    witness_ids = tok.encode(witness, add_special_tokens=False)
    ctx = build_teacher_context(tok, MESSAGES, witness, [11], max_witness_tokens=10)
    assert ctx.witness_tokens == 10 and ctx.witness_truncated
    text = tok.decode(ctx.input_ids)
    assert tok.decode(witness_ids[:10]) + "\n=== Reference Solution End ===" in text
    assert witness not in text
    full = build_teacher_context(tok, MESSAGES, witness, [11], max_witness_tokens=None)
    assert full.witness_tokens == len(witness_ids) and not full.witness_truncated


def test_cut_inside_multibyte_character(qwen_tokenizer):
    tok = qwen_tokenizer
    witness = "ab 龘龘龘"
    ids = tok.encode(witness, add_special_tokens=False)
    cut = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    ctx = build_teacher_context(tok, MESSAGES, witness, [11], max_witness_tokens=cut)
    assert "\ufffd" not in tok.decode(ctx.input_ids)


def test_max_length_shortens_witness_only(qwen_tokenizer):
    tok = qwen_tokenizer
    target = _target(tok)
    witness = " ".join(f"step{i}" for i in range(200))
    full = build_teacher_context(tok, MESSAGES, witness, target)
    assert not full.witness_truncated
    # exactly fitting: nothing cut
    same = build_teacher_context(tok, MESSAGES, witness, target, max_length=len(full.input_ids))
    assert same == full
    limit = len(full.input_ids) - 57
    ctx = build_teacher_context(tok, MESSAGES, witness, target, max_length=limit)
    assert len(ctx.input_ids) <= limit
    assert ctx.input_ids[ctx.prompt_length :] == target  # target intact
    assert ctx.witness_truncated
    assert full.witness_tokens - 60 <= ctx.witness_tokens < full.witness_tokens  # no gratuitous over-cut
    text = tok.decode(ctx.input_ids)
    assert PROBLEM in text and "=== Reference Solution End ===" in text


def test_impossible_max_length_raises(qwen_tokenizer):
    tok = qwen_tokenizer
    target = _target(tok)
    bare = build_teacher_context(tok, MESSAGES, "", target)
    fits = build_teacher_context(tok, MESSAGES, WITNESS, target, max_length=len(bare.input_ids))
    assert fits.witness_tokens == 0 and fits.witness_truncated
    assert fits.input_ids == bare.input_ids
    with pytest.raises(ValueError, match="max_length"):
        build_teacher_context(tok, MESSAGES, WITNESS, target, max_length=len(bare.input_ids) - 1)


def test_braces_and_placeholders_in_text_survive(qwen_tokenizer):
    tok = qwen_tokenizer
    problem = "Let f(x) = {x}^2 and S = {1, 2}. Is {witness} or {problem} or {} or {0} special?"
    witness = "No: {problem} stays literal, \\frac{a}{b}."
    ctx = build_teacher_context(tok, [{"role": "user", "content": problem}], witness, [11])
    text = tok.decode(ctx.input_ids)
    assert f"<|im_start|>user\n{problem}\n\nHere is a reference solution" in text
    assert f"=== Reference Solution Begin ===\n{witness}\n=== Reference Solution End ===" in text
    assert text.count("Reference Solution Begin") == 1


def test_plain_list_from_apply_chat_template(qwen_tokenizer):
    class ListTokenizer:  # older transformers: tokenize=True returns a plain list of ids
        def __getattr__(self, name):
            return getattr(qwen_tokenizer, name)

        def apply_chat_template(self, messages, **kw):
            return list(qwen_tokenizer.apply_chat_template(messages, **kw)["input_ids"])

    a = build_teacher_context(ListTokenizer(), MESSAGES, WITNESS, [11])
    b = build_teacher_context(qwen_tokenizer, MESSAGES, WITNESS, [11])
    assert a == b


@pytest.mark.parametrize(
    "messages, kw, match",
    [
        ([{"role": "system", "content": "s"}], {}, "user"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], {}, "string"),
        (MESSAGES, {"template": "{problem} only"}, "witness"),
        (MESSAGES, {"template": "{witness} only"}, "problem"),
        (MESSAGES, {"witness_thinking": "drop"}, "witness_thinking"),
        (MESSAGES, {"max_witness_tokens": -1}, "max_witness_tokens"),
    ],
)
def test_errors(qwen_tokenizer, messages, kw, match):
    with pytest.raises(ValueError, match=match):
        build_teacher_context(qwen_tokenizer, messages, WITNESS, [11], **kw)
