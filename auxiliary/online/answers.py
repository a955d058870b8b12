"""Everything of a batch of interactions before its update: the policies' replies with their collapse
monitors, and the simulated users' follow-ups.

`Answering.answers(steps)` gives a batch's BatchAnswers; `Answering.beside(learn, next_steps)` runs the
update. With --overlap_generation the next batch is answered during that update, in a thread, by frozen
copies of the weights from before it (arms.FrozenPolicy): every batch after the first is answered by
weights one update older, and `generated_by_update` in metrics.jsonl says which."""
from __future__ import annotations

import time
from dataclasses import dataclass

from auxiliary.runtime.seeds import derive_seed


@dataclass
class ArmAnswers:
    """One arm's part of a batch."""
    replies: list  # generation.GeneratedResponse per step
    monitors: list[dict]  # collapse.reply_monitors per reply
    gen_time: float  # seconds of the batched generation
    generated_by: int  # updates the answering weights had seen
    followups: list[str]
    sim_time: float  # seconds the users took


@dataclass
class BatchAnswers:
    steps: list[int]
    prompts: list
    conversations: list[list[dict]]
    styles: list[str]  # the user's style at each step
    arms: dict[str, ArmAnswers]


class Answering:
    def __init__(self, arms, users: dict, train_prompts: list, plan, seed: int, overlap: bool = False):
        self.arms, self.users, self.train_prompts, self.plan, self.seed = arms, users, train_prompts, plan, seed
        self.frozen = arms.frozen_copies() if overlap else {}  # arm -> the weights that answer the next batch
        self.ahead: dict = {}  # --overlap_generation: first step of a batch -> its answers (or error), made ahead

    def answers(self, steps: list[int]) -> BatchAnswers:
        if not self.frozen:
            return self.answer(steps, {arm: self.arms.policy(arm, self.plan.style_at(steps[0])) for arm in self.arms})
        if steps[0] in self.ahead:
            answers = self.ahead.pop(steps[0])
            if isinstance(answers, BaseException):
                raise answers  # answering ahead failed: the batch before it is written, this one is not
            return answers
        for frozen in self.frozen.values():  # the run's first batch: nothing ran ahead of it
            frozen.refresh()
        return self.answer(steps, self.frozen)

    def beside(self, learn, next_steps: list[int] | None):
        """learn(); with --overlap_generation, `next_steps` is answered meanwhile by the weights before it."""
        if not (self.frozen and next_steps):
            return learn()
        from auxiliary.runtime.generation import run_side_by_side

        for frozen in self.frozen.values():
            frozen.refresh()  # the weights before this update answer the next batch

        def answer_ahead():
            try:
                return self.answer(next_steps, self.frozen)
            except Exception as err:  # raised when that batch's turn comes, after this one is written
                return err

        learned, self.ahead[next_steps[0]] = run_side_by_side([learn, answer_ahead])
        return learned

    def answer(self, steps: list[int], policies: dict) -> BatchAnswers:
        """The replies to `steps` by `policies` ({arm: its updater or FrozenPolicy}), with their collapse
        monitors and the users' follow-ups."""
        from auxiliary.evals.collapse import reply_monitors
        from auxiliary.evals.evaluation_helpers import prompt_as_messages

        prompts = [self.train_prompts[step - 1] for step in steps]
        conversations = [prompt_as_messages(prompt) for prompt in prompts]
        styles = [self.plan.style_at(step) for step in steps]  # a function of the step (and seed): a resume replays it

        def answer(arm):
            policy = policies[arm]  # per-user adapters run with B = 1 (checked by the config)
            generated_by = policy.step
            started = time.perf_counter()
            # One sampling seed per batch, from its first step (B = 1: the step's own seed, as always).
            replies = policy.generate(conversations, seed=derive_seed(self.seed, "train", steps[0]))
            generated = time.perf_counter()
            # Collapse monitors of each reply, scored by the weights that wrote it (before the update).
            monitors = [reply_monitors(policy.model, policy.tokenizer, messages, reply.text)
                        for messages, reply in zip(conversations, replies)]
            return replies, monitors, generated - started, generated_by

        answered = self.arms.per_arm(answer)  # the policies' work may run in parallel; the users' never does
        arms = {}
        for arm in self.arms:
            replies, monitors, gen_time, generated_by = answered[arm]
            asked = time.perf_counter()
            followups = self.followups(arm, steps, styles, prompts, [reply.text for reply in replies])
            arms[arm] = ArmAnswers(replies, monitors, gen_time, generated_by, followups, time.perf_counter() - asked)
        return BatchAnswers(steps, prompts, conversations, styles, arms)

    def followups(self, arm: str, steps: list[int], styles: list[str], prompts: list, texts: list[str]) -> list[str]:
        """Each reply's follow-up from its step's user: one call per user of the batch, whose randomness is a
        function of (seed, arm, the user's first step in the batch), so a resume replays it (B = 1: the step)."""
        followups: list = [None] * len(steps)
        for style in dict.fromkeys(styles):
            rows = [i for i, s in enumerate(styles) if s == style]
            answers = self.users[arm][style].generate_feedback(
                [prompts[i] for i in rows], [texts[i] for i in rows],
                seed=derive_seed(self.seed, "user", arm, steps[rows[0]]))
            for i, answer in zip(rows, answers):
                followups[i] = answer
        return followups
