"""The token view page (ssopd_verl.token_view): spans in order, colours, tooltips, escaping, NaN, bounds."""

from __future__ import annotations

import html
import math
import re

import numpy as np
import pytest

from ssopd_verl.token_view import (
    DEFAULT_SCALE,
    MAX_TEXT_CHARS,
    NAN_COLOUR,
    NEWLINE_MARK,
    TokenViewRecord,
    colour,
    render_html,
    write_token_view,
)

SPAN = re.compile(r'<span class="(t[^"]*)" style="background:([^"]+)" title="([^"]*)">(.*?)</span>', re.S)


def _record(tok, target_text="The answer is 42.", witness_text="So x = 7, and the answer is 7.", **overrides):
    target_ids = tok.encode(target_text)
    n = len(target_ids)
    fields = dict(
        step=3,
        uid="group-1",
        weight=0.25,
        problem="Find x such that 2x = 14.",
        witness_ids=tok.encode(witness_text),
        target_ids=target_ids,
        loss=[0.1 * i for i in range(n)],
        kl=[0.2 * i for i in range(n)],
        teacher_logp=[-0.5] * n,
        student_logp=[-1.5] * n,
        teacher_argmax=list(target_ids),
        reward_target=0.0,
        reward_witness=1.0,
    )
    fields.update(overrides)
    return TokenViewRecord(**fields)


def _spans(page):
    return SPAN.findall(page)


def test_tokens_appear_in_order_as_spans(qwen_tokenizer):
    tok = qwen_tokenizer
    rec = _record(tok)
    page = render_html([rec], tok)
    spans = _spans(page)
    assert len(spans) == len(rec.target_ids)
    pieces = [html.unescape(body) for _, _, _, body in spans]
    assert pieces == [tok.decode([i]) for i in rec.target_ids]
    assert "".join(pieces) == "The answer is 42."
    # The witness is decoded and shown in the left column; the problem above.
    assert "So x = 7, and the answer is 7." in page
    assert "Find x such that 2x = 14." in page
    assert page.startswith("<!DOCTYPE html>")
    # Self-contained: no script, no external resource.
    assert "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page and "src=" not in page


def test_colour_scale():
    assert colour(0.0) == "rgb(255,255,255)"
    assert colour(-0.3) == "rgb(255,255,255)"
    assert colour(DEFAULT_SCALE) == "rgb(255,0,0)"
    assert colour(5.0) == "rgb(255,0,0)"
    assert colour(0.5, scale=0.5) == "rgb(255,0,0)"
    assert colour(0.5) == "rgb(255,128,128)"
    greens = [int(re.fullmatch(r"rgb\(255,(\d+),\1\)", colour(x)).group(1)) for x in np.linspace(0, 1.2, 25)]
    assert all(a >= b for a, b in zip(greens, greens[1:]))
    assert greens[0] == 255 and greens[-1] == 0
    for bad in (float("nan"), float("inf"), -float("inf"), None):
        assert colour(bad) == NAN_COLOUR
    assert NAN_COLOUR not in {colour(x) for x in np.linspace(0, 1, 256)}
    with pytest.raises(ValueError):
        colour(0.1, scale=0.0)


def test_span_colours_follow_loss(qwen_tokenizer):
    tok = qwen_tokenizer
    rec = _record(tok)
    n = len(rec.target_ids)
    rec.loss = [0.0] + [0.3] * (n - 2) + [2.0]
    spans = _spans(render_html([rec], tok))
    assert spans[0][1] == "rgb(255,255,255)"
    assert spans[-1][1] == "rgb(255,0,0)"
    assert spans[1][1] == colour(0.3)
    # A custom scale zooms in.
    spans = _spans(render_html([rec], tok, scale=0.3))
    assert spans[1][1] == "rgb(255,0,0)"


def test_tooltip_holds_the_numbers(qwen_tokenizer):
    tok = qwen_tokenizer
    rec = _record(tok)
    other = tok.encode(" Paris")[0]
    rec.loss[1] = 0.1234
    rec.kl[1] = 2.5
    rec.teacher_logp[1] = math.log(0.8)
    rec.student_logp[1] = math.log(0.1)
    rec.teacher_argmax[1] = other
    cls, _, tip, _ = _spans(render_html([rec], tok))[1]
    tip = html.unescape(tip)
    assert f"{tok.decode([rec.target_ids[1]])!r}" in tip
    assert "loss 0.1234 nats" in tip
    assert "KL 2.5000 nats" in tip
    assert "p_T(sampled) 0.8000" in tip
    assert "p_S(sampled) 0.1000" in tip
    assert f"log p_T - log p_S {math.log(8):.4f}" in tip
    assert "teacher argmax ' Paris'" in tip
    assert "miss" in cls  # argmax differs from the sampled token: dotted underline
    assert "miss" not in _spans(render_html([rec], tok))[0][0]
    # Tiny values are not rounded to zero.
    rec.loss[1] = 3e-5
    assert "loss 3.00e-05 nats" in html.unescape(_spans(render_html([rec], tok))[1][2])


def test_header_numbers(qwen_tokenizer):
    tok = qwen_tokenizer
    rec = _record(tok)
    page = render_html([rec], tok, title="my run")
    assert "<title>my run</title>" in page
    mean_loss = float(np.mean(rec.loss))
    assert f"<td>mean loss (nats / token)</td><td>{mean_loss:.4f}</td>" in page
    assert "<td>mean teacher&minus;student log-prob gain (nats / token)</td><td>1.0000</td>" in page
    assert "<td>step</td><td>3</td>" in page
    assert "reward target 0.0000 / witness 1.0000" in page
    ref = _record(tok, reward_witness=None, step=7)
    page = render_html([rec, ref], tok)
    assert "witness reference solution" in page and "<td>step</td><td>3, 7</td>" in page
    assert "No distilled targets" in render_html([], tok)


def test_hostile_text_is_escaped(qwen_tokenizer):
    tok = qwen_tokenizer
    hostile = 'Hi <script>alert(1)</script> & "quoted" \'single\' <img src=x onerror=alert(2)>'
    rec = _record(tok, target_text=hostile, witness_text=hostile, problem=hostile, uid='<b>"uid"</b>')
    rec.teacher_argmax[0] = tok.encode("<script>")[1]
    page = render_html([rec], tok, title="<script>alert(3)</script>")
    assert "<script" not in page.lower()
    assert "<img" not in page.lower()
    assert "<b>\"uid\"" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # witness / problem, escaped whole
    assert "&amp;" in page and "&quot;quoted&quot;" in page
    # Each tooltip is one well-formed attribute: no raw quote or angle bracket inside.
    for _, _, tip, body in _spans(page):
        assert '"' not in tip and "<" not in tip and ">" not in tip
        assert "<" not in body.replace("<br>", "").replace("<i>", "").replace("</i>", "")
    pieces = "".join(html.unescape(body) for *_, body in _spans(page))
    assert pieces == hostile


def test_newlines_and_partial_utf8(qwen_tokenizer):
    tok = qwen_tokenizer
    text = "line one\n\nline two 🜁 end"
    rec = _record(tok, target_text=text, witness_text="a\nb")
    page = render_html([rec], tok)
    bodies = [body for *_, body in _spans(page)]
    assert any(NEWLINE_MARK + "<br>" in b for b in bodies)
    joined = "".join(html.unescape(b.replace(NEWLINE_MARK + "<br>", "\n")) for b in bodies)
    assert joined == "".join(tok.decode([i]) for i in rec.target_ids)
    assert "\ufffd" in joined  # a partial UTF-8 byte piece of the emoji, shown as-is
    assert f"a{NEWLINE_MARK}<br>b" in page  # witness newlines too


def test_nan_values_render(qwen_tokenizer):
    tok = qwen_tokenizer
    rec = _record(
        tok,
        weight=float("nan"),
        reward_target=float("inf"),
    )
    rec.loss[0] = float("nan")
    rec.kl[0] = float("inf")
    rec.teacher_logp[1] = float("nan")
    rec.student_logp[1] = -float("inf")
    rec.teacher_argmax[2] = -1
    page = render_html([rec], tok)
    spans = _spans(page)
    assert spans[0][1] == NAN_COLOUR and "nan" in spans[0][0]
    tip0 = html.unescape(spans[0][2])
    assert "loss nan nats" in tip0 and "KL nan nats" in tip0
    tip1 = html.unescape(spans[1][2])
    assert "p_T(sampled) nan" in tip1 and "p_S(sampled) nan" in tip1 and "log p_T - log p_S nan" in tip1
    assert "teacher argmax nan" in html.unescape(spans[2][2])
    assert "weight nan" in page and "reward target nan" in page
    # All-NaN losses: header mean is nan, no crash.
    rec.loss = [float("nan")] * len(rec.target_ids)
    assert "<td>mean loss (nats / token)</td><td>nan</td>" in render_html([rec], tok)
    # NaN argmax given as a float, numpy inputs.
    rec2 = _record(tok, teacher_argmax=np.array([np.nan] + [1.0] * (len(tok.encode("The answer is 42.")) - 1)))
    assert rec2.teacher_argmax[0] == -1
    render_html([rec2], tok)


@pytest.mark.parametrize("field", ["loss", "kl", "teacher_logp", "student_logp", "teacher_argmax"])
def test_length_validation(qwen_tokenizer, field):
    tok = qwen_tokenizer
    good = _record(tok)
    with pytest.raises(ValueError, match=field):
        _record(tok, **{field: getattr(good, field)[:-1]})
    # A record mutated after construction is checked again at render time.
    setattr(good, field, getattr(good, field) + [0])
    with pytest.raises(ValueError, match=field):
        render_html([good], tok)


def test_type_validation(qwen_tokenizer):
    tok = qwen_tokenizer
    with pytest.raises(ValueError, match="target_ids"):
        _record(tok, target_ids="abc")
    with pytest.raises(ValueError, match="loss"):
        _record(tok, loss=None)
    with pytest.raises(ValueError, match="max_tokens_per_target"):
        render_html([_record(tok)], tok, max_tokens_per_target=-1)


def test_truncation_notices(qwen_tokenizer):
    tok = qwen_tokenizer
    rec = _record(tok)
    n = len(rec.target_ids)
    page = render_html([rec], tok, max_tokens_per_target=2)
    assert len(_spans(page)) == 2
    assert f"{n - 2} more tokens omitted; 2 of {n} shown" in page
    assert "more tokens omitted" not in render_html([rec], tok)

    long_witness = tok.encode("abcd " * 5000)  # 25,000 characters
    rec = _record(tok, witness_ids=long_witness)
    page = render_html([rec], tok)
    assert f"{25_000 - MAX_TEXT_CHARS} more characters of witness text omitted" in page
    assert "characters of witness text omitted" not in render_html([_record(tok)], tok)


def test_mapping_records_and_write(qwen_tokenizer, tmp_path):
    tok = qwen_tokenizer
    rec = _record(tok, problem="π ≈ 3.14159 <x>")
    as_dict = {k: getattr(rec, k) for k in rec.__dataclass_fields__}
    out = write_token_view(tmp_path / "a" / "b" / "view.html", [as_dict], tok, title="t")
    assert out.exists() and out.parent.name == "b"
    text = out.read_text(encoding="utf-8")
    assert text == render_html([rec], tok, title="t")
    assert "π ≈ 3.14159 &lt;x&gt;" in text


def test_record_from_the_trainer_shows_the_teachers_prompt_and_both_rewards(qwen_tokenizer):
    """What the worker writes (ssopd.token_view_every): the teacher's whole prompt in place of the witness, and the
    target's and the witness's rewards (the trainer puts them in the update batch); a reference-solution witness
    has no reward of its own."""
    tok = qwen_tokenizer
    rec = _record(tok, witness_text="Problem. Here is a reference solution: x = 7", reward_target=0.0,
                  reward_witness=1.0, witness_is_teacher_prompt=True)  # fmt: skip
    page = render_html([rec], tok)
    assert "The teacher's prompt (problem, template and witness" in page and "Witness (" not in page
    assert "reward target 0.0000 / witness 1.0000" in page
    assert len(_spans(page)) == len(rec.target_ids)
    opsd = _record(tok, reward_target=0.0, reward_witness=None, witness_is_teacher_prompt=True)
    assert "reward target 0.0000 / witness reference solution" in render_html([opsd], tok)


def test_page_is_logged_to_wandb_when_it_is_a_tracker(qwen_tokenizer, tmp_path, monkeypatch):
    """verl's tracking starts wandb in the trainer's process; the trainer hands it the page as wandb.Html
    (offline here: the run's files hold the page)."""
    wandb = pytest.importorskip("wandb")  # installed with verl
    from ssopd_verl.glue.trainer import log_token_view

    page = write_token_view(tmp_path / "step_000002.html", [_record(qwen_tokenizer)], qwen_tokenizer)
    assert log_token_view(page, 2, ["console", "file"]) is False  # not a tracker here
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="ssopd-test")
    try:
        assert log_token_view(page, 2, ["console", "wandb"]) is True
    finally:
        run.finish()
    logged = list(tmp_path.glob("wandb/offline-run-*/files/media/html/ssopd/token_view_*.html"))
    assert len(logged) == 1 and 'class="record"' in logged[0].read_text()
