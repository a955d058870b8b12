"""Who the simulated user is at each interaction: one style, a schedule of styles, or several users.

    schedule = StyleSchedule.parse("concise:250,detailed:250")   # a preference flip after 250
    schedule.style_at(251) -> "detailed";  schedule.phase_at(251) -> 1;  schedule.boundaries -> [250]
    StyleSchedule.single("no_emojis", 15)                         # --style: the one-phase case
    MultiUserDraw(["concise", "no_emojis"], seed=1234).style_at(7) # --users: a seeded draw per step

Every style is checked against the personas before anything is loaded; a malformed item, an
unknown style or N <= 0 is one ValueError naming the item.
"""
from __future__ import annotations

from dataclasses import dataclass

from auxiliary.feedback.personas import get_persona
from auxiliary.runtime.seeds import seeded_rng


@dataclass(frozen=True)
class Phase:
    style: str
    interactions: int
    first_step: int  # 1-based


class StyleSchedule:
    def __init__(self, items: list[tuple[str, int]]):
        if not items:
            raise ValueError("--style_schedule is empty; write STYLE:N[,STYLE:N...], e.g. concise:250,detailed:250")
        phases, step = [], 1
        for style, count in items:
            get_persona(style)  # UnknownStyleError (a ValueError) lists the known styles
            if count <= 0:
                raise ValueError(f"--style_schedule item {style}:{count}: N must be >= 1")
            phases.append(Phase(style, count, step))
            step += count
        self.phases = phases

    @classmethod
    def parse(cls, text: str) -> "StyleSchedule":
        items = []
        for raw in text.split(","):
            item = raw.strip()
            style, sep, count = item.partition(":")
            if not sep or not style.strip() or not count.strip().lstrip("-").isdigit():
                raise ValueError(f"--style_schedule item {item!r} is not STYLE:N (e.g. concise:250)")
            items.append((style.strip(), int(count)))
        return cls(items)

    @classmethod
    def single(cls, style: str, interactions: int) -> "StyleSchedule":
        return cls([(style, max(1, interactions))])

    @property
    def total(self) -> int:
        return sum(p.interactions for p in self.phases)

    @property
    def styles(self) -> list[str]:
        return list(dict.fromkeys(p.style for p in self.phases))

    @property
    def boundaries(self) -> list[int]:
        """The last step of every phase but the final one (where the user's style changes)."""
        return [p.first_step + p.interactions - 1 for p in self.phases[:-1]]

    def phase_at(self, step: int) -> int:
        for index, phase in enumerate(self.phases):
            if step < phase.first_step + phase.interactions:
                return index
        return len(self.phases) - 1  # past the end: the last phase goes on

    def style_at(self, step: int) -> str:
        return self.phases[self.phase_at(step)].style

    def describe(self) -> str:
        return ", ".join(f"{p.style} for steps {p.first_step}-{p.first_step + p.interactions - 1}"
                         for p in self.phases)


class MultiUserDraw:
    """Several users at once: the user of each interaction drawn at random, seeded by (seed, step)."""

    def __init__(self, styles: list[str], seed: int):
        styles = [s.strip() for s in styles if s.strip()]
        if len(styles) < 2:
            raise ValueError("--users needs at least two styles, e.g. concise,no_emojis")
        for style in styles:
            get_persona(style)
        self.styles, self.seed = list(dict.fromkeys(styles)), seed

    def style_at(self, step: int) -> str:
        return seeded_rng(self.seed, "user-draw", step).choice(self.styles)
