"""The self-teacher's input: the student's prompt with the witness as a reference solution, then the target.

SSOPD's teacher is the same policy (stop-gradient) given privileged context: the witness (the group's shortest
correct completion, or the dataset's solution in the OPSD ablation) is inserted into the *user* turn, as a
reference solution wrapped in ``template``, and the chat template is rendered again with the generation prompt.
The target's response token ids are then appended *verbatim*: they are never decoded and re-encoded, because
the teacher must score exactly the tokens the student sampled (decode/encode does not round-trip in general,
e.g. a multi-byte character split across sampled tokens, or a non-canonical tokenisation the policy produced).
Position ``prompt_length + t`` of the teacher sequence therefore lines up with response position ``t`` of the
student sequence.

The witness, on the other hand, is text that the teacher reads, so it goes through the tokenizer: it is decoded
by the caller (special tokens skipped), optionally stripped of its ``<think>...</think>`` block, encoded, cut to
``max_witness_tokens`` and, if the whole teacher sequence would exceed ``max_length``, cut further (never the
target). Any cut is reported in ``witness_truncated``.

Pure module: the standard library only (the tokenizer is passed in).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_TEMPLATE = (
    "{problem}\n\nHere is a reference solution to this problem:\n=== Reference Solution Begin ===\n{witness}\n"
    "=== Reference Solution End ===\n\nAfter reading the reference solution above, make sure you truly understand "
    "the reasoning behind each step — do not copy or paraphrase it. Now, using your own words and independent "
    "reasoning, derive the same final answer to the problem above."
)
THINKING_MODES = ("keep", "strip")

_PLACEHOLDER = re.compile(r"\{(problem|witness)\}")
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def strip_thinking(text: str) -> str:
    """Remove the ``<think>...</think>`` reasoning of a completion and the whitespace around what remains.

    * Every closed ``<think>...</think>`` block is removed.
    * A stray ``</think>`` without its opening tag (templates that put ``<think>`` in the prompt, so the
      response starts inside the reasoning) drops everything up to and including the last ``</think>``.
    * An unclosed ``<think>`` (no ``</think>`` at all) leaves the text unchanged: the reasoning never ended,
      so it is all there is, and it holds the answer that made the completion correct; returning "" would
      turn the witness into an empty reference.
    """
    if "</think>" not in text:
        return text
    text = _THINK_BLOCK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text.strip()


@dataclass(frozen=True)
class TeacherContext:
    input_ids: list[int]  # teacher prompt ids + target response ids
    prompt_length: int  # teacher prompt tokens (the response starts here)
    witness_tokens: int  # witness tokens actually inserted (counted before rendering into the prompt)
    witness_truncated: bool  # the witness was cut (max_witness_tokens or max_length)


def _fill(template: str, problem: str, witness: str) -> str:
    # One pass over the template: braces in math text ("\frac{1}{2}") are left alone, and a problem that
    # contains "{witness}" (or a witness containing "{problem}") is not expanded a second time.
    values = {"problem": problem, "witness": witness}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _render(tokenizer, messages, chat_template_kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, **chat_template_kwargs)
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding for tokenize=True
        out = out["input_ids"]
    return [int(t) for t in out]


def build_teacher_context(
    tokenizer,
    prompt_messages,
    witness_text,
    target_response_ids,
    *,
    template=DEFAULT_TEMPLATE,
    witness_thinking="keep",
    max_witness_tokens=4096,
    max_length=None,
    chat_template_kwargs=None,
) -> TeacherContext:
    """Teacher input ids for one (witness, target) pair.

    prompt_messages: the student's chat messages (verl's ``raw_prompt``); the last user message is the problem.
    witness_text: the witness response as text. target_response_ids: the target's response token ids (no
    padding). chat_template_kwargs: as for the student (e.g. ``{"enable_thinking": False}``).
    max_witness_tokens=None means no cap; max_length=None means no overall limit.
    """
    for name in ("problem", "witness"):
        if "{" + name + "}" not in template:
            raise ValueError(f"template must contain the {{{name}}} placeholder")
    if witness_thinking not in THINKING_MODES:
        raise ValueError(f"unknown witness_thinking {witness_thinking!r}; expected one of {THINKING_MODES}")
    if max_witness_tokens is not None and max_witness_tokens < 0:
        raise ValueError("max_witness_tokens must be >= 0 (or None)")

    messages = [dict(m) for m in prompt_messages]  # never mutate the caller's (shared) raw_prompt
    user = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not user:
        raise ValueError("prompt_messages has no user message to hold the problem")
    problem = messages[user[-1]]["content"]
    if not isinstance(problem, str):
        raise ValueError("the last user message's content must be a string (multimodal content unsupported)")

    kwargs = dict(chat_template_kwargs or {})
    kwargs.update(add_generation_prompt=True, tokenize=True)  # the teacher must see the assistant header
    target = [int(t) for t in target_response_ids]

    if witness_thinking == "strip":
        witness_text = strip_thinking(witness_text)
    witness_ids = list(tokenizer.encode(witness_text, add_special_tokens=False))
    keep = len(witness_ids) if max_witness_tokens is None else min(len(witness_ids), max_witness_tokens)

    while True:
        witness = witness_text
        if keep < len(witness_ids):
            # A cut can split a multi-byte character; drop its replacement char rather than insert garbage.
            witness = tokenizer.decode(witness_ids[:keep]).rstrip("\ufffd")
        messages[user[-1]]["content"] = _fill(template, problem, witness)
        prompt = _render(tokenizer, messages, kwargs)
        overflow = 0 if max_length is None else len(prompt) + len(target) - max_length
        if overflow <= 0:
            break
        if keep == 0:
            raise ValueError(
                f"teacher context does not fit max_length={max_length} even without a witness "
                f"(prompt {len(prompt)} + target {len(target)} tokens)"
            )
        # Each pass removes at least one witness token, so the loop ends; one pass is usual, a second one
        # only when re-tokenising the shortened witness in context shifts the count.
        keep = max(0, keep - overflow)

    return TeacherContext(
        input_ids=prompt + target,
        prompt_length=len(prompt),
        witness_tokens=keep,
        witness_truncated=keep < len(witness_ids),
    )
