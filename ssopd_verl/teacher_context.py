"""The self-teacher's input: the student's prompt with the witness as a reference solution, then the target.

SSOPD's teacher is the same policy (stop-gradient) given privileged context: the witness (the group's shortest
correct completion, or the dataset's solution in the OPSD ablation) is inserted into the *user* turn, as a
reference solution wrapped in ``template``, and the chat template is rendered again with the generation prompt.
The target's response token ids are then appended *verbatim*: they are never decoded and re-encoded, because
the teacher must score exactly the tokens the student sampled (decode/encode does not round-trip in general,
e.g. a multi-byte character split across sampled tokens, or a non-canonical tokenisation the policy produced).
Position ``prompt_length + t`` of the teacher sequence therefore lines up with response position ``t`` of the
student sequence.

The witness enters as token ids spliced into the rendered prompt, never as text that the tokenizer parses
together with the template: the chat template is rendered with a sentinel where the witness goes, the text
around the sentinel is encoded (it holds the template's real control tokens), and the witness ids go in
between. A sampled witness keeps its own ids, minus control tokens (its closing ``<|im_end|>``); a witness that
is text (a dataset's reference solution) is encoded by :func:`encode_untrusted_text`, with special tokens
split. Either way, a policy that spelled ``<|im_end|>\n<|im_start|>assistant`` as ordinary tokens cannot open a
fake turn in the teacher's prompt: those tokens stay ordinary tokens.

Length. The witness is capped at ``max_witness_tokens`` and, if the whole teacher sequence would exceed
``max_length``, cut further (never the target). A cut keeps the witness's head and its tail (the end of the
reasoning, ``</think>`` and the answer: what makes it a witness) and puts :data:`CUT_MARKER` where tokens were
removed; ``witness_truncated`` reports it. A target whose teacher sequence does not fit even with an empty
witness raises :class:`TeacherContextTooLong` (the caller skips that target and counts it).

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
    witness_tokens: int  # witness tokens actually inserted (a cut witness: head + marker + tail)
    witness_truncated: bool  # the witness was cut (max_witness_tokens or max_length)


def _fill(template: str, problem: str, witness: str) -> str:
    # One pass over the template: braces in math text ("\frac{1}{2}") are left alone, and a problem that
    # contains "{witness}" (or a witness containing "{problem}") is not expanded a second time.
    values = {"problem": problem, "witness": witness}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


CUT_MARKER = "\n\n[... part of the reference solution omitted ...]\n\n"
_SENTINEL = "\u0000SSOPD_WITNESS\u0000"  # never in a rendered chat template; checked below


class TeacherContextTooLong(ValueError):
    """The teacher sequence exceeds ``max_length`` even with an empty witness."""


def control_token_ids(tokenizer) -> set[int]:
    """Ids that only the chat template may emit: the tokenizer's special tokens (``<|im_start|>``, ``<|im_end|>``,
    ``<|endoftext|>``, ...). Plain added tokens such as Qwen3's ``<think>`` are text the model writes itself.

    ``all_special_ids`` alone is not enough: it lists the tokens named in the tokenizer's special-token map (for
    Qwen3: eos and pad only), while ``<|im_start|>`` and the other chat/vision markers are *added* tokens marked
    ``special`` (``added_tokens_decoder``). Both sets count."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    marked = {int(i) for i, token in added.items() if getattr(token, "special", False)}
    return {int(i) for i in tokenizer.all_special_ids} | marked


def encode_untrusted_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` in which no special token can appear, even where the text spells one.

    transformers' tokenizers take ``split_special_tokens=True`` for exactly this (``"<|im_end|>"`` becomes the
    ordinary tokens ``<``, ``|``, ``im``, ...). The result is checked, so a tokenizer that ignored the flag fails
    loudly here instead of letting a fake turn through.
    """
    ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)]
    leaked = control_token_ids(tokenizer).intersection(ids)
    if leaked:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} produced control tokens {sorted(leaked)} from text although "
            "split_special_tokens=True was passed; it cannot encode a witness safely"
        )
    return ids


def witness_from_response(tokenizer, response_ids, witness_thinking: str = "keep") -> list[int]:
    """The witness ids of a sampled completion: its ids without control tokens, optionally without its reasoning.

    ``witness_thinking="strip"`` keeps what follows the last ``</think>`` token (and drops whitespace-only tokens
    right after it); a completion without ``</think>`` is kept whole: its reasoning never ended, so it is all
    there is, and it holds the answer that made it correct.
    """
    if witness_thinking not in THINKING_MODES:
        raise ValueError(f"unknown witness_thinking {witness_thinking!r}; expected one of {THINKING_MODES}")
    control = control_token_ids(tokenizer)
    ids = [int(t) for t in response_ids if int(t) not in control]
    if witness_thinking == "strip":
        end = _think_end_id(tokenizer)
        if end is not None and end in ids:
            ids = ids[len(ids) - ids[::-1].index(end) :]
            while ids and not tokenizer.decode(ids[:1]).strip():
                ids = ids[1:]
    return ids


def _think_end_id(tokenizer):
    token_id = tokenizer.convert_tokens_to_ids("</think>")
    return None if token_id is None or token_id == tokenizer.unk_token_id else int(token_id)


def cut_middle(witness: list[int], keep: int, marker: list[int], think_end_id=None) -> list[int]:
    """Shorten ``witness`` to ``keep`` ids, keeping its head and its tail with ``marker`` in between.

    The tail gets at least half of the room and, when the witness has a ``</think>``, everything after it plus a
    quarter of the room for the end of the reasoning, so the answer survives any cut that leaves room for it.
    With room for the marker and little else, only the tail is kept (the answer matters more than the start).
    """
    if keep >= len(witness):
        return list(witness)
    if keep <= 0:
        return []
    room = keep - len(marker)
    if room < 2:
        return list(witness[len(witness) - keep :])
    answer = 0
    if think_end_id is not None and think_end_id in witness:
        answer = len(witness) - (len(witness) - 1 - witness[::-1].index(think_end_id))
    tail = min(room, max((room + 1) // 2, answer + room // 4))
    head = room - tail
    return list(witness[:head]) + list(marker) + list(witness[len(witness) - tail :])


def _render_around_witness(tokenizer, messages, chat_template_kwargs) -> tuple[list[int], list[int]]:
    """The teacher prompt's ids before and after the witness (which :func:`build_teacher_context` splices in)."""
    kwargs = dict(chat_template_kwargs or {})
    kwargs.update(add_generation_prompt=True, tokenize=False)  # the teacher must see the assistant header
    text = tokenizer.apply_chat_template(messages, **kwargs)
    if text.count(_SENTINEL) != 1:
        raise ValueError("the rendered teacher prompt must hold the witness exactly once (check ssopd.template)")
    before, after = text.split(_SENTINEL)
    # The template's own text: encoded as the chat template's tokenize=True path does (special tokens parsed).
    encode = lambda part: [int(t) for t in tokenizer.encode(part, add_special_tokens=False)] if part else []
    return encode(before), encode(after)


def build_teacher_context(
    tokenizer,
    prompt_messages,
    witness_ids,
    target_response_ids,
    *,
    template=DEFAULT_TEMPLATE,
    max_witness_tokens=4096,
    max_length=None,
    chat_template_kwargs=None,
) -> TeacherContext:
    """Teacher input ids for one (witness, target) pair.

    prompt_messages: the student's chat messages (verl's ``raw_prompt``); the last user message is the problem.
    witness_ids: the witness as token ids free of control tokens (:func:`witness_from_response` for a sampled
    completion, :func:`encode_untrusted_text` for a text solution). target_response_ids: the target's response
    ids as the teacher must score them (no padding; the caller may pass only the first K). chat_template_kwargs:
    as for the student (e.g. ``{"enable_thinking": False}``). max_witness_tokens=None: no cap;
    max_length=None: no overall limit. Raises :class:`TeacherContextTooLong` if even an empty witness does not fit.
    """
    for name in ("problem", "witness"):
        if "{" + name + "}" not in template:
            raise ValueError(f"template must contain the {{{name}}} placeholder")
    if max_witness_tokens is not None and max_witness_tokens < 0:
        raise ValueError("max_witness_tokens must be >= 0 (or None)")

    messages = [dict(m) for m in prompt_messages]  # never mutate the caller's (shared) raw_prompt
    user = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not user:
        raise ValueError("prompt_messages has no user message to hold the problem")
    problem = messages[user[-1]]["content"]
    if not isinstance(problem, str):
        raise ValueError("the last user message's content must be a string (multimodal content unsupported)")
    if _SENTINEL in problem:
        raise ValueError("the problem text contains the teacher template's internal sentinel")
    messages[user[-1]]["content"] = _fill(template, problem, _SENTINEL)
    before, after = _render_around_witness(tokenizer, messages, chat_template_kwargs)

    witness = [int(t) for t in witness_ids]
    target = [int(t) for t in target_response_ids]
    room = len(witness) if max_witness_tokens is None else min(len(witness), max_witness_tokens)
    if max_length is not None:
        fixed = len(before) + len(after) + len(target)
        if fixed > max_length:
            raise TeacherContextTooLong(
                f"teacher context does not fit max_length={max_length} even without a witness "
                f"(prompt {len(before) + len(after)} + target {len(target)} tokens)"
            )
        room = min(room, max_length - fixed)
    kept = witness
    if room < len(witness):
        marker = encode_untrusted_text(tokenizer, CUT_MARKER)
        kept = cut_middle(witness, room, marker, _think_end_id(tokenizer))
    prompt = before + kept + after
    return TeacherContext(
        input_ids=prompt + target,
        prompt_length=len(prompt),
        witness_tokens=len(kept),
        witness_truncated=room < len(witness),
    )
