"""The tiny default's task: two-digit addition with a worked, column-by-column solution.

The user turn is ``"What is 37 + 48? Please reason step by step, and put your final answer within \\boxed{}."`` and
the worked completion ``"<think>\\n7+8=15\\n3+4+1=8\\n</think>\\n\\n\\boxed{85}"`` (column sums from the units
up, the carry passed on). The problems are every ordered pair of operands in
``spec.min_operand..spec.max_operand`` (10..99: 8,100 problems). The slip of a wrong completion
(:meth:`Problem.slipped_solution`): on problems whose units carry, the carry dropped; elsewhere one column sum off
by one, so the student's slip falls at a known token (the ``+1``-vs-``=`` choice, or the column-sum digit).

Reward: ``data_source`` is :data:`DATA_SOURCE` = ``"lighteval/MATH"``. verl 0.9.1's ``default_compute_score``
has no branch that calls math-verify (its math-verify call is commented out); ``"lighteval/MATH"`` routes to
``math_reward.compute_score`` (last ``\\boxed{}``, normalised string equivalence; 1.0 / 0.0), which is exact for
these integer answers. To grade with math-verify through verl's reward path, point verl's custom reward hook at
``ssopd_verl.evaluation.grading.compute_score`` (the grader of the evaluation too):
``reward.custom_reward_function.path=pkg://ssopd_verl.evaluation.grading
reward.custom_reward_function.name=compute_score`` (it grades in a spawned process pool: scripts need an
``if __name__ == "__main__":`` guard).

Pure: the standard library (and the evaluation's ``last_boxed``); no torch, no verl.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from ssopd_verl.tiny_default.tasks.base import INSTRUCTION, is_correct

__all__ = ["ABILITY", "DATA_SOURCE", "Addition", "Problem"]

# verl's default_compute_score sends this data source to math_reward (last \boxed{}, string equivalence).
DATA_SOURCE = "lighteval/MATH"
ABILITY = "math"


@dataclass(frozen=True)
class Problem:
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
        return _worked(self.a, self.b)

    @property
    def has_carry(self) -> bool:
        """The units column carries into the tens."""
        return self.a % 10 + self.b % 10 >= 10

    def slipped_solution(self, rng: random.Random) -> str:
        """A worked completion with one plausible slip, carried through consistently to a wrong boxed answer.

        A problem whose units carry: the carry is dropped (``3+4=7`` for ``3+4+1=8``). Otherwise one column sum
        (chosen with ``rng``) is off by one (sign chosen with ``rng``). So a student trained on a mix of these and
        correct completions has a per-problem chance of a slip at a known token: on carry problems the
        ``+1``-vs-``=`` choice, elsewhere the column-sum digit."""
        if self.has_carry:
            text = _worked(self.a, self.b, drop_carry=True)
        else:
            column = rng.randrange(2)
            delta = rng.choice((-1, 1))
            digits = ((self.a // 10**column) % 10, (self.b // 10**column) % 10)
            if sum(digits) + delta < 0:  # 0+0 (never for 2-digit operands) can only go up
                delta = 1
            text = _worked(self.a, self.b, off=(column, delta))
        assert not is_correct(text, self.answer), (self, text)
        return text


def _worked(a: int, b: int, *, drop_carry: bool = False, off: Optional[tuple] = None) -> str:
    """Column sums from the units up, the carry passed on, the boxed answer read off the sums. ``drop_carry``: the
    tens column ignores the units' carry; ``off=(column, delta)``: that column's sum is written ``delta`` off.
    Either way the rest follows consistently from the slipped sum."""
    steps, digits, carry, column = [], [], 0, 0
    x, y = a, b
    while x or y:
        dx, dy = x % 10, y % 10
        c = 0 if (drop_carry and column == 1) else carry
        s = dx + dy + c + (off[1] if off is not None and off[0] == column else 0)
        steps.append(f"{dx}+{dy}" + (f"+{c}" if c else "") + f"={s}")
        carry, column = s // 10, column + 1
        digits.append(s % 10)
        x, y = x // 10, y // 10
    answer = int("".join(str(d) for d in ([carry] if carry else []) + digits[::-1]))
    return "<think>\n" + "\n".join(steps) + "\n</think>\n\n\\boxed{" + str(answer) + "}"


class Addition:
    """The task (:class:`~ssopd_verl.tiny_default.tasks.base.Task`): every ordered pair ``(a, b)`` with
    ``spec.min_operand <= a, b <= spec.max_operand``, ``a`` major."""

    name = "addition"
    data_source = DATA_SOURCE
    ability = ABILITY
    spec_defaults: dict = {}  # the default spec is this task's preset

    def problems(self, spec) -> list:
        lo, hi = spec.min_operand, spec.max_operand
        return [Problem(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]
