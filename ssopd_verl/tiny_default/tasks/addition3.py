"""A harder task for the tiny default: three-digit addition, three columns with carries into the tens and the
hundreds, more places to slip than the default task's two-digit addition.

The user turn is ``"What is 347 + 586? Please reason step by step, and put your final answer within \\boxed{}."``
and the worked completion ``"<think>\\n7+6=13\\n4+8+1=13\\n3+5+1=9\\n</think>\\n\\n\\boxed{933}"``: column sums
from the units up, the carry passed on, the format of :mod:`.addition` with one more column (about 30 response
tokens with the compact tokenizer, under the tiny default's 48). The problems are a fixed sample of
:data:`N_PROBLEMS` distinct ordered pairs of operands in ``spec.min_operand..spec.max_operand`` (the preset
:data:`SPEC_DEFAULTS` sets 100..999; all 810,000 pairs would make the tokenizer's corpus needlessly large), drawn
with a seed of their own: the spec's seed then shuffles them into the splits as for every task.

The slip of a wrong completion (:meth:`Problem3.slipped_solution`): on problems with a carry into the tens or the
hundreds, *one* of those carries is dropped (which one is drawn with ``rng``); elsewhere one column sum (drawn) off
by one (sign drawn). Either way the rest of the working follows consistently from the slipped sum, so the boxed
answer is off by exactly 10, 100 (or 1, for the units). With two carries the slip can fall at either, so a
student warm-started on these sits lower than on the default task, spread over more tokens.

Why a second task: on the default task every method's greedy validation accuracy rises from 0.55 to ~0.7 in 12
steps and saturates, too fast to separate GRPO from SSOPD. Here the preset (:data:`SPEC_DEFAULTS`) puts the
sampled student lower (band 0.1-0.4) with the teacher prompt far above it. Measured (seed 0, the manifest's
held-out measurement: 128 val problems x 4 samples, temperature 1): student 0.244, teacher prompt 0.961, greedy
student 0.258; the warm start met its targets at step 500 (check: student 0.301, teacher prompt 0.965); 2,712 s of
one core on the shared 2-core machine (load 8-20). The student's accuracy differs by kind of problem (8 samples on
128 RL train problems: 0.56 without carries, 0.09-0.15 with one or two; 96 of the 128 groups mixed, 31 all wrong).

Reward: the same ``data_source`` as the default task (``"lighteval/MATH"``, integer answers; see
:mod:`.addition`).

Pure: the standard library (and the evaluation's ``last_boxed``); no torch, no verl.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from ssopd_verl.tiny_default.tasks.addition import ABILITY, DATA_SOURCE
from ssopd_verl.tiny_default.tasks.base import INSTRUCTION, is_correct

__all__ = ["N_PROBLEMS", "SPEC_DEFAULTS", "Addition3", "Problem3"]

# How many distinct operand pairs the task has (val + train + check + the warm-start set).
N_PROBLEMS = 16384

# The task's preset: TinyDefaultSpec.for_task("addition3") is the default spec with these replaced. The warm
# start's student targets are correct with probability student_correct_frac (the rest slipped), which sets where
# the sampled student settles; the teacher prompt learns to read the reference and answer correctly.
SPEC_DEFAULTS: dict = {
    "min_operand": 100,
    "max_operand": 999,
    "student_correct_frac": 0.25,
    "band": (0.1, 0.4),
    "teacher_min": 0.7,
}


@dataclass(frozen=True)
class Problem3:
    a: int
    b: int

    @property
    def question(self) -> str:
        return f"What is {self.a} + {self.b}?"

    @property
    def prompt(self) -> str:
        """The user turn (question + the boxed-answer instruction)."""
        return f"{self.question} {INSTRUCTION}"

    @property
    def messages(self) -> list:
        return [{"role": "user", "content": self.prompt}]

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def solution(self) -> str:
        """The worked completion: column sums from the units up in a think block, then the boxed answer."""
        return worked(self.a, self.b)

    @property
    def carry_columns(self) -> tuple:
        """The columns (1 = tens, 2 = hundreds, ...) that receive a carry in the correct working."""
        out, carry, column, x, y = [], 0, 0, self.a, self.b
        while x or y:
            if carry:
                out.append(column)
            carry = (x % 10 + y % 10 + carry) // 10
            x, y, column = x // 10, y // 10, column + 1
        return tuple(out)

    @property
    def n_columns(self) -> int:
        return max(len(str(self.a)), len(str(self.b)))

    def slipped_solution(self, rng: random.Random) -> str:
        """A worked completion with one plausible slip, carried through consistently to a wrong boxed answer.

        A problem with carries: one of the carries (drawn with ``rng``) is dropped (``4+8=12`` for ``4+8+1=13``).
        Otherwise one column sum (drawn) is off by one (sign drawn). The slip falls at a known token: the
        ``+1``-vs-``=`` choice of the dropped carry's column, or that column's sum digit."""
        carries = self.carry_columns
        if carries:
            text = worked(self.a, self.b, drop_carry=rng.choice(carries))
        else:
            column = rng.randrange(self.n_columns)
            delta = rng.choice((-1, 1))
            digits = ((self.a // 10**column) % 10, (self.b // 10**column) % 10)
            if sum(digits) + delta < 0:  # 0+0 can only go up
                delta = 1
            text = worked(self.a, self.b, off=(column, delta))
        assert not is_correct(text, self.answer), (self, text)
        return text


def worked(a: int, b: int, *, drop_carry: Optional[int] = None, off: Optional[tuple] = None) -> str:
    """Column sums from the units up, the carry passed on, the boxed answer read off the sums. ``drop_carry=c``:
    column ``c`` ignores its incoming carry; ``off=(column, delta)``: that column's sum is written ``delta`` off.
    Either way the rest follows consistently from the slipped sum."""
    steps, digits, carry, column = [], [], 0, 0
    x, y = a, b
    while x or y:
        dx, dy = x % 10, y % 10
        c = 0 if column == drop_carry else carry
        s = dx + dy + c + (off[1] if off is not None and off[0] == column else 0)
        steps.append(f"{dx}+{dy}" + (f"+{c}" if c else "") + f"={s}")
        carry, column = s // 10, column + 1
        digits.append(s % 10)
        x, y = x // 10, y // 10
    answer = int("".join(str(d) for d in ([carry] if carry else []) + digits[::-1]))
    return "<think>\n" + "\n".join(steps) + "\n</think>\n\n\\boxed{" + str(answer) + "}"


class Addition3:
    """The task (:class:`~ssopd_verl.tiny_default.tasks.base.Task`): :data:`N_PROBLEMS` distinct ordered pairs
    ``(a, b)`` with ``spec.min_operand <= a, b <= spec.max_operand``, drawn with a fixed seed (all of them if there
    are fewer), in the order drawn."""

    name = "addition3"
    data_source = DATA_SOURCE
    ability = ABILITY
    spec_defaults = SPEC_DEFAULTS

    def problems(self, spec) -> list:
        lo, hi = spec.min_operand, spec.max_operand
        width = hi - lo + 1
        total = width * width
        rng = random.Random(f"{self.name}/{lo}/{hi}")
        picks = rng.sample(range(total), min(N_PROBLEMS, total))
        return [Problem3(lo + k // width, lo + k % width) for k in picks]
