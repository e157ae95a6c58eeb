"""Token view: an HTML page showing what SSOPD distils, token by token.

For each distilled *target* (a wrong completion) the page shows, side by side, the *witness* the self-teacher saw
in its prompt (a correct sibling completion, or a reference solution) and the target's tokens, each on a
background whose colour encodes the per-token clipped forward-KL loss ``l[t]`` (nats) on a **fixed** scale:
white at ``l = 0``, saturated red at ``l >= scale`` (default ``scale = 1.0`` nats), linear in between. A fixed
scale (not one normalised to each record's maximum) keeps pages from different steps comparable; pass ``scale``
to ``render_html`` to zoom in on small losses. Non-finite values are drawn on a grey that is not on that scale
and are written ``nan``. A dotted underline marks tokens where the teacher's most likely token is not the
sampled one. Hovering a token shows (native ``title=`` tooltip, no JavaScript): the token text (``repr``), its
loss, unclipped KL, ``p_T`` and ``p_S`` of the sampled token, the teacher-student log-prob gain
``log p_T - log p_S`` and the teacher's argmax token.

The page is self-contained: inline CSS, no script, no external resource. Everything from the policy or the data
(problem, witness, tokens) is HTML-escaped. Bounded: at most ``max_tokens_per_target`` tokens per target and
``MAX_TEXT_CHARS`` characters of witness / problem text are rendered; the page says how much was omitted.

Pure module: no verl import; numpy/stdlib only. The tokenizer is passed in and only ``tokenizer.decode(ids)`` is
used: target tokens are decoded one id at a time (a byte-level BPE piece may be a partial UTF-8 sequence and
decode to U+FFFD, shown as-is), the witness is decoded in one piece.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = [
    "DEFAULT_SCALE",
    "MAX_TEXT_CHARS",
    "NAN_COLOUR",
    "TokenViewRecord",
    "colour",
    "render_html",
    "write_token_view",
]

DEFAULT_SCALE = 1.0  # nats: loss at which a token's background is saturated red
MAX_TEXT_CHARS = 20_000  # characters of witness (and problem) text rendered per record
NAN_COLOUR = "rgb(190,190,190)"  # non-finite values; not on the white-to-red scale
NEWLINE_MARK = "\u21b5"  # ↵

_PER_TOKEN_FIELDS = ("loss", "kl", "teacher_logp", "student_logp", "teacher_argmax")


@dataclass
class TokenViewRecord:
    """One distilled target (a wrong completion) with its witness and per-token numbers.

    ``loss``, ``kl``, ``teacher_logp``, ``student_logp`` and ``teacher_argmax`` have one entry per token of
    ``target_ids``. ``reward_witness`` is None when the witness is a reference solution. Sequences may be lists,
    tuples or numpy arrays; they are converted to lists. Lengths are checked on construction (``ValueError``
    naming the field); non-finite floats are kept and rendered as ``nan``.
    """

    step: int
    uid: str
    weight: float
    problem: str
    witness_ids: list[int]
    target_ids: list[int]
    loss: list[float]
    kl: list[float]
    teacher_logp: list[float]
    student_logp: list[float]
    teacher_argmax: list[int]
    reward_target: Optional[float] = None  # None: not known where the record was made (shown as –)
    reward_witness: Optional[float] = None
    # True: witness_ids hold the teacher's whole prompt (problem, template and witness), as the trainer's worker
    # sees it; the page then says so instead of "witness".
    witness_is_teacher_prompt: bool = False

    def __post_init__(self) -> None:
        self.step = int(self.step)
        self.uid = str(self.uid)
        self.problem = "" if self.problem is None else str(self.problem)
        self.weight = _as_float(self.weight, "weight")
        if self.reward_target is not None:
            self.reward_target = _as_float(self.reward_target, "reward_target")
        self.witness_is_teacher_prompt = bool(self.witness_is_teacher_prompt)
        if self.reward_witness is not None:
            self.reward_witness = _as_float(self.reward_witness, "reward_witness")
        self.witness_ids = _as_ids(self.witness_ids, "witness_ids")
        self.target_ids = _as_ids(self.target_ids, "target_ids")
        for name in ("loss", "kl", "teacher_logp", "student_logp"):
            setattr(self, name, _as_floats(getattr(self, name), name))
        self.teacher_argmax = _as_argmax(self.teacher_argmax, "teacher_argmax")
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first per-token field whose length differs from ``target_ids``."""
        n = len(self.target_ids)
        for name in _PER_TOKEN_FIELDS:
            m = len(getattr(self, name))
            if m != n:
                raise ValueError(f"TokenViewRecord.{name} has {m} entries, target_ids has {n} (uid={self.uid!r})")


# ---------------------------------------------------------------------------------------------------- inputs


def _as_float(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"TokenViewRecord.{name} must be a number, got {value!r}") from e


def _as_list(values: Any, name: str) -> list:
    if values is None:
        raise ValueError(f"TokenViewRecord.{name} is missing (None)")
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise ValueError(f"TokenViewRecord.{name} must be 1-D, got shape {values.shape}")
        return values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"TokenViewRecord.{name} must be a sequence, got {type(values).__name__}")
    return list(values)


def _as_ids(values: Any, name: str) -> list[int]:
    out = []
    for v in _as_list(values, name):
        try:
            out.append(int(v))
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"TokenViewRecord.{name} must hold token ids, got {v!r}") from e
    return out


def _as_floats(values: Any, name: str) -> list[float]:
    out = []
    for v in _as_list(values, name):
        try:
            out.append(float(v))
        except (TypeError, ValueError) as e:
            raise ValueError(f"TokenViewRecord.{name} must hold numbers, got {v!r}") from e
    return out


def _as_argmax(values: Any, name: str) -> list[int]:
    """Token ids; a missing or non-finite entry becomes -1 (rendered ``nan``)."""
    out = []
    for v in _as_list(values, name):
        if v is None:
            out.append(-1)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError) as e:
            raise ValueError(f"TokenViewRecord.{name} must hold token ids, got {v!r}") from e
        out.append(int(f) if math.isfinite(f) else -1)
    return out


def _coerce(record: Union[TokenViewRecord, Mapping[str, Any]]) -> TokenViewRecord:
    if isinstance(record, TokenViewRecord):
        record.validate()
        return record
    if isinstance(record, Mapping):
        return TokenViewRecord(**record)
    raise TypeError(f"expected a TokenViewRecord or a mapping, got {type(record).__name__}")


# ---------------------------------------------------------------------------------------------------- colour


def colour(loss: float, scale: float = DEFAULT_SCALE) -> str:
    """Background colour of a token with loss ``loss`` (nats): ``rgb(255,g,g)``, linear in ``loss / scale``.

    White ``rgb(255,255,255)`` at ``loss <= 0``; saturated red ``rgb(255,0,0)`` at ``loss >= scale``;
    ``NAN_COLOUR`` (grey) for a non-finite loss.
    """
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number of nats, got {scale!r}")
    try:
        loss = float(loss)
    except (TypeError, ValueError):
        return NAN_COLOUR
    if not math.isfinite(loss):
        return NAN_COLOUR
    frac = min(1.0, max(0.0, loss / scale))
    g = int(round(255 * (1.0 - frac)))
    return f"rgb(255,{g},{g})"


# ---------------------------------------------------------------------------------------------------- formatting


def _num(x: Optional[float]) -> str:
    """A number for the page: ``nan`` if non-finite, 4 decimals, scientific below 1e-3."""
    if x is None:
        return "n/a"
    x = float(x)
    if not math.isfinite(x):
        return "nan"
    if x == 0 or abs(x) >= 1e-3:
        return f"{x:.4f}"
    return f"{x:.2e}"


def _prob(logp: float) -> str:
    return _num(math.exp(logp)) if math.isfinite(logp) else "nan"


def _finite_mean(values: Iterable[float]) -> float:
    arr = np.asarray(list(values), dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _clean(text: str) -> str:
    """Replace characters HTML cannot carry (C0 controls other than tab/newline, lone surrogates) by escapes."""
    out = []
    for ch in text:
        o = ord(ch)
        if (o < 32 and ch not in "\t\n") or o == 127 or 0xD800 <= o <= 0xDFFF:
            out.append(f"\\x{o:02x}" if o < 256 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _esc(text: str) -> str:
    return html.escape(_clean(text), quote=True)


def _esc_attr(text: str) -> str:
    """Escaped for a double-quoted attribute; newlines become ``&#10;`` (line breaks in native tooltips)."""
    return _esc(text).replace("\n", "&#10;").replace("\t", "&#9;")


def _visible(text: str) -> str:
    """Escaped token text for the page body: each newline is a visible ↵ followed by a line break."""
    return _esc(text).replace("\n", NEWLINE_MARK + "<br>")


def _truncate(text: str, limit: int) -> tuple[str, int]:
    if len(text) <= limit:
        return text, 0
    return text[:limit], len(text) - limit


class _Decoder:
    """One-id decodes, cached; an id the tokenizer cannot decode is shown as ``<id N?>``."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def piece(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        text = self.cache.get(token_id)
        if text is None:
            try:
                text = str(self.tokenizer.decode([token_id]))
            except Exception:  # noqa: BLE001 - an odd id must not break the page
                text = f"<id {token_id}?>"
            self.cache[token_id] = text
        return text

    def text(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        try:
            return str(self.tokenizer.decode(list(ids)))
        except Exception:  # noqa: BLE001
            return "".join(self.piece(i) for i in ids)


# ---------------------------------------------------------------------------------------------------- page

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #111; background: #fafafa; }
h1 { font-size: 1.4em; margin: 0 0 .4em 0; }
.header { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .8em 1em; margin-bottom: 1.2em; }
.header p { margin: .3em 0; }
.summary td { padding: .1em 1.2em .1em 0; }
.summary td:first-child { color: #555; }
.legend { display: inline-block; width: 16em; height: 1em; vertical-align: middle; border: 1px solid #999;
          background: linear-gradient(to right, rgb(255,255,255), rgb(255,0,0)); }
.swatch { display: inline-block; width: 1.2em; height: 1em; vertical-align: middle; border: 1px solid #999; }
.record { background: #fff; border: 1px solid #ccc; border-radius: 6px; margin: 0 0 1.5em 0; padding: .6em .8em; }
.record h2 { font-size: 1.05em; margin: 0 0 .4em 0; font-weight: 600; }
.meta { color: #444; font-size: .9em; margin-bottom: .4em; }
.problem { white-space: pre-wrap; font-size: .9em; background: #f4f4f8; padding: .4em .6em; border-radius: 4px;
           max-height: 12em; overflow: auto; margin-bottom: .5em; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.col h3 { font-size: .9em; margin: 0 0 .3em 0; color: #333; }
.text { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: .82em; line-height: 1.55;
        white-space: pre-wrap; word-break: break-word; border: 1px solid #e3e3e3; padding: .5em; max-height: 48em;
        overflow: auto; background: #fff; }
.text span.t { border-radius: 2px; }
.text span.t.miss { text-decoration: underline dotted #333; }
.text span.t.nan { outline: 1px dashed #777; }
.omitted { color: #a00; font-style: italic; font-family: system-ui, sans-serif; }
"""


def _token_span(
    dec: _Decoder, token_id: int, loss: float, kl: float, lt: float, ls: float, am: int, scale: float
) -> str:
    text = dec.piece(token_id)
    gain = lt - ls if (math.isfinite(lt) and math.isfinite(ls)) else float("nan")
    am_text = repr(dec.piece(am)) if am >= 0 else "nan"
    tip = (
        f"token {token_id}: {text!r}\n"
        f"loss {_num(loss)} nats\n"
        f"KL {_num(kl)} nats\n"
        f"p_T(sampled) {_prob(lt)}\n"
        f"p_S(sampled) {_prob(ls)}\n"
        f"log p_T - log p_S {_num(gain)}\n"
        f"teacher argmax {am_text}"
    )
    classes = ["t"]
    if am >= 0 and am != token_id:
        classes.append("miss")
    if not all(math.isfinite(v) for v in (loss, kl, lt, ls)) or am < 0:
        classes.append("nan")
    body = _visible(text) if text else "<i>&#8709;</i>"  # ∅ for a piece that decodes to nothing
    return (
        f'<span class="{" ".join(classes)}" style="background:{colour(loss, scale)}" '
        f'title="{_esc_attr(tip)}">{body}</span>'
    )


def _record_html(index: int, rec: TokenViewRecord, dec: _Decoder, scale: float, max_tokens: int) -> str:
    n = len(rec.target_ids)
    shown = min(n, max_tokens)
    gains = [a - b for a, b in zip(rec.teacher_logp, rec.student_logp)]
    misses = sum(1 for a, t in zip(rec.teacher_argmax, rec.target_ids) if a >= 0 and a != t)
    loss_arr = np.asarray(rec.loss, dtype=np.float64)
    finite = loss_arr[np.isfinite(loss_arr)]
    witness_reward = "reference solution" if rec.reward_witness is None else _num(rec.reward_witness)
    meta = (
        f"step {rec.step} &middot; group {_esc(rec.uid)} &middot; weight {_num(rec.weight)} &middot; "
        f"reward target {'&ndash;' if rec.reward_target is None else _num(rec.reward_target)} / witness "
        f"{witness_reward} &middot; "
        f"{n} target tokens &middot; mean loss {_num(_finite_mean(rec.loss))} &middot; "
        f"sum loss {_num(float(finite.sum()) if finite.size else float('nan'))} &middot; "
        f"max loss {_num(float(finite.max()) if finite.size else float('nan'))} &middot; "
        f"mean gain {_num(_finite_mean(gains))} &middot; "
        f"argmax&ne;sampled {misses}/{n}"
    )

    problem, problem_cut = _truncate(rec.problem, MAX_TEXT_CHARS)
    problem_html = _esc(problem)
    if problem_cut:
        problem_html += f'\n<span class="omitted">[&hellip; {problem_cut} more characters omitted]</span>'

    witness, witness_cut = _truncate(dec.text(rec.witness_ids), MAX_TEXT_CHARS)
    witness_html = _visible(witness)
    if witness_cut:
        witness_html += f'<span class="omitted">[&hellip; {witness_cut} more characters of witness text omitted]</span>'
    witness_title = "reference solution" if rec.reward_witness is None else "correct sibling completion"
    witness_heading = (
        f"The teacher's prompt (problem, template and witness, {len(rec.witness_ids)} tokens)"
        if rec.witness_is_teacher_prompt
        else f"Witness ({witness_title}, {len(rec.witness_ids)} tokens) &mdash; in the teacher's prompt"
    )

    spans = [
        _token_span(
            dec,
            rec.target_ids[i],
            rec.loss[i],
            rec.kl[i],
            rec.teacher_logp[i],
            rec.student_logp[i],
            rec.teacher_argmax[i],
            scale,
        )
        for i in range(shown)
    ]
    if n > shown:
        spans.append(
            f'<span class="omitted">[&hellip; {n - shown} more tokens omitted; '
            f"{shown} of {n} shown]</span>"
        )

    return (
        f'<div class="record" id="r{index}">\n'
        f"<h2>#{index + 1} &middot; step {rec.step} &middot; group {_esc(rec.uid)}</h2>\n"
        f'<div class="meta">{meta}</div>\n'
        f'<div class="problem">{problem_html}</div>\n'
        f'<div class="cols">\n'
        f'<div class="col"><h3>{witness_heading}</h3>'
        f'<div class="text witness">{witness_html}</div></div>\n'
        f'<div class="col"><h3>Target (wrong completion, {n} tokens) &mdash; distilled</h3>'
        f'<div class="text target">{"".join(spans)}</div></div>\n'
        f"</div>\n</div>\n"
    )


def render_html(
    records: Sequence[Union[TokenViewRecord, Mapping[str, Any]]],
    tokenizer: Any,
    *,
    title: Optional[str] = None,
    max_tokens_per_target: int = 4096,
    scale: float = DEFAULT_SCALE,
) -> str:
    """A self-contained HTML page showing, per distilled target, its witness and its tokens coloured by loss.

    ``records``: ``TokenViewRecord``s (or mappings of their fields). ``tokenizer``: anything with
    ``decode(list[int]) -> str``. ``scale``: loss (nats) drawn as saturated red (fixed, default 1.0, so pages
    from different steps compare). Header means are token means over all tokens of all targets (finite values
    only), including tokens beyond ``max_tokens_per_target``.
    """
    recs = [_coerce(r) for r in records]
    max_tokens = int(max_tokens_per_target)
    if max_tokens < 0:
        raise ValueError(f"max_tokens_per_target must be >= 0, got {max_tokens_per_target!r}")
    colour(0.0, scale)  # validates scale
    scale = float(scale)
    dec = _Decoder(tokenizer)

    steps = sorted({r.step for r in recs})
    if not steps:
        step_text = "none"
    elif len(steps) == 1:
        step_text = str(steps[0])
    elif len(steps) <= 8:
        step_text = ", ".join(map(str, steps))
    else:
        step_text = f"{steps[0]}&ndash;{steps[-1]} ({len(steps)} steps)"
    all_loss = [v for r in recs for v in r.loss]
    all_kl = [v for r in recs for v in r.kl]
    all_gain = [a - b for r in recs for a, b in zip(r.teacher_logp, r.student_logp)]
    n_tokens = sum(len(r.target_ids) for r in recs)
    page_title = title if title is not None else f"SSOPD token view — step {', '.join(map(str, steps)) or 'none'}"
    if len(page_title) > 300:
        page_title = page_title[:300] + "…"

    header = (
        f'<div class="header">\n<h1>{_esc(page_title)}</h1>\n'
        "<p>Each block is one distilled <b>target</b>: a wrong completion whose every token is pulled towards the "
        "<b>self-teacher</b>, the same policy with a correct <b>witness</b> (a sibling completion, or a reference "
        "solution) inserted in its prompt. Left: the witness the teacher saw. Right: the target's tokens.</p>\n"
        f'<p>Background = per-token clipped forward-KL loss l[t] (nats), fixed scale: '
        f'<span class="swatch" style="background:{colour(0.0, scale)}"></span> 0 '
        f'<span class="legend"></span> '
        f'<span class="swatch" style="background:{colour(scale, scale)}"></span> &ge; {_num(scale)} nats, '
        "linear in between. "
        f'<span class="swatch" style="background:{NAN_COLOUR}"></span> non-finite value (shown as nan). '
        '<span style="text-decoration: underline dotted #333">dotted underline</span> = the teacher\'s most likely '
        "token differs from the sampled one. " + NEWLINE_MARK + " = newline.</p>\n"
        "<p>Hover a token for: its text, loss, unclipped KL, p_T and p_S of the sampled token (teacher / student "
        "probability), the gain log p_T &minus; log p_S (positive: the teacher likes the token more than the "
        "student does) and the teacher's argmax token.</p>\n"
        '<table class="summary">'
        f"<tr><td>step</td><td>{step_text}</td></tr>"
        f"<tr><td>targets</td><td>{len(recs)}</td></tr>"
        f"<tr><td>target tokens</td><td>{n_tokens}</td></tr>"
        f"<tr><td>mean loss (nats / token)</td><td>{_num(_finite_mean(all_loss))}</td></tr>"
        f"<tr><td>mean unclipped KL (nats / token)</td><td>{_num(_finite_mean(all_kl))}</td></tr>"
        "<tr><td>mean teacher&minus;student log-prob gain (nats / token)</td>"
        f"<td>{_num(_finite_mean(all_gain))}</td></tr>"
        "</table>\n</div>\n"
    )
    body = "".join(_record_html(i, r, dec, scale, max_tokens) for i, r in enumerate(recs))
    if not recs:
        body = "<p><i>No distilled targets.</i></p>\n"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_esc(page_title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"{header}{body}</body>\n</html>\n"
    )


def write_token_view(
    path: Union[str, Path],
    records: Sequence[Union[TokenViewRecord, Mapping[str, Any]]],
    tokenizer: Any,
    **kw: Any,
) -> Path:
    """Render (``render_html(records, tokenizer, **kw)``) and write the page to ``path`` (UTF-8, dirs created)."""
    path = Path(path)
    page = render_html(records, tokenizer, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(page.encode("utf-8", errors="replace"))
    return path
