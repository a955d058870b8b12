"""The arms of an online run and the policies that answer and learn for them.

The feedback arm learns from the simulated users; with --placebo a second arm starts from the same
weights and learns from neutral approvals. With --per_user_adapters each user has a LoRA adapter of its
own on the arm's one base model, and `policy(arm, style)` is that adapter's updater. The arms work one
after the other, or (--arms_in_parallel) side by side, each in a thread with its share of the torch
threads. FrozenPolicy is --overlap_generation's copy of a policy that answers the next batch while the
update runs."""
from __future__ import annotations

import copy
import dataclasses

ARMS = ("feedback", "placebo")
# Model-config dropout rates (besides nn.Dropout modules) that --arms_in_parallel refuses when above 0.
DROPOUT_SETTINGS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop",
                    "hidden_dropout_prob", "attention_probs_dropout_prob")


class ArmsError(RuntimeError):
    """The arms cannot run as asked; the message is the whole story."""


class Arms:
    def __init__(self, names, in_parallel: bool = False, user_styles=(), per_user: bool = False):
        self.names = list(names)
        self.in_parallel = in_parallel and len(self.names) > 1
        self.user_styles, self.per_user = list(user_styles), per_user
        self.updaters: dict = {}  # arm -> the shared policy's updater (per-user adapters: the first user's)
        self.adapter_updaters: dict = {}  # per-user adapters: arm -> {style: updater on that style's adapter}

    def __iter__(self):
        return iter(self.names)

    def load(self, config) -> None:
        """The arms' updaters from `config` (the run checkpoints, never the updaters on their own)."""
        from online_sdpo_updater import OnlineSDPOUpdater

        first = OnlineSDPOUpdater(config)
        if self.per_user:
            # Each arm: one base model (the placebo's a copy, taken before any user adapter exists).
            models = {arm: first.model if arm == "feedback" else copy.deepcopy(first.model) for arm in self.names}
            for arm in self.names:
                self.adapter_updaters[arm] = self._adapter_updaters(models[arm], first.tokenizer, config)
                self.updaters[arm] = self.adapter_updaters[arm][self.user_styles[0]]
            return
        self.updaters["feedback"] = first
        if config.use_vllm:
            first.vllm_engine()  # started now: an engine that cannot start is bad input, found before any work
        if "placebo" in self.names:
            twin = copy.deepcopy(first.model)  # the same initial weights, without a second load
            # In two threads each arm has its own tokenizer (a fast tokenizer is not safe to share between threads).
            tokenizer = copy.deepcopy(first.tokenizer) if self.in_parallel else first.tokenizer
            self.updaters["placebo"] = OnlineSDPOUpdater(config, model=twin, tokenizer=tokenizer)

    def _adapter_updaters(self, peft_model, tokenizer, config) -> dict:
        """One LoRA adapter per user on the arm's one base model (peft's named adapters: no copy of the base
        weights); each updater's optimizer holds only its adapter's parameters."""
        from online_sdpo_updater import OnlineSDPOUpdater

        template = peft_model.peft_config[peft_model.active_adapter]
        # The model arrives wrapped: the updater must not wrap it again (use_lora off for it alone).
        adapter_config = dataclasses.replace(config, use_lora=False)
        updaters = {}
        for style in self.user_styles:
            peft_model.add_adapter(style, dataclasses.replace(template))
            peft_model.set_adapter(style)  # trainable: this adapter's parameters only
            updaters[style] = OnlineSDPOUpdater(adapter_config, model=peft_model, tokenizer=tokenizer)
        if "default" in peft_model.peft_config:
            peft_model.delete_adapter("default")  # the wrapping updater's own adapter: no user trains it
        return updaters

    def policy(self, arm: str, style: str):
        """The updater that answers and learns for `style`'s user: the arm's shared policy, or that user's adapter."""
        if not self.per_user:
            return self.updaters[arm]
        updater = self.adapter_updaters[arm][style]
        updater.model.set_adapter(style)
        return updater

    def per_arm(self, work) -> dict:
        """{arm: work(arm)}: one arm after the other, or (--arms_in_parallel) each arm in its own thread with
        its share of the torch threads; `work` must touch only its arm's policy."""
        if not self.in_parallel:
            return {arm: work(arm) for arm in self.names}
        from auxiliary.runtime.generation import run_side_by_side

        return dict(zip(self.names, run_side_by_side([lambda arm=arm: work(arm) for arm in self.names])))

    def check_side_by_side(self) -> None:
        """Two arms in two threads give the replies and weights of one after the other only when nothing in
        them draws from the process's one random stream: sampling does not (generation.SeededSampler), dropout
        would."""
        import torch

        for arm, updater in self.updaters.items():
            config = getattr(updater.model, "config", None)
            rates = [m.p for m in updater.model.modules() if isinstance(m, torch.nn.Dropout)]
            rates += [float(getattr(config, name, 0) or 0) for name in DROPOUT_SETTINGS]
            if any(rate > 0 for rate in rates):
                raise ArmsError(f"--arms_in_parallel needs a model without dropout (the {arm} arm's has "
                                f"{max(rates)}; with --use_lora set --lora_dropout 0): dropout draws from the "
                                "process's one random stream, which two threads would share")

    def frozen_copies(self) -> dict:
        return {arm: FrozenPolicy(updater) for arm, updater in self.updaters.items()}

    # ------------------------------------------------------------ checkpoints of every arm
    def save_checkpoint(self, folder, step: int, keep: int) -> None:
        """Every arm's checkpoint of `step`, then the marker that names it, then pruning (`keep` 0: keep all)."""
        for arm in self.names:
            self.updaters[arm].save_checkpoint(folder.checkpoint_path(arm, step))
        # The marker names a step only once every arm has it: a crash in between resumes from the older one.
        folder.write_checkpoint_marker(step, self.names)
        from auxiliary.runtime.checkpoints import prune_checkpoints

        for arm in self.names:  # pruned only now, so the marker's step always survives
            prune_checkpoints(folder.checkpoint_root / arm, keep)

    def load_checkpoints(self, paths: dict) -> None:
        for arm, path in paths.items():
            self.updaters[arm].load_checkpoint(path)


class FrozenPolicy:
    """--overlap_generation: a copy of an arm's policy that answers the next batch in a thread while the
    update changes the policy. It holds only what generation reads (the settings, its own model and
    tokenizer) and generates with OnlineSDPOUpdater.generate itself (the same settings and seeds);
    `refresh` copies the trainable weights back in before each update (the others never change: a
    LoRA run copies only its adapters, though the copy holds the whole model)."""

    def __init__(self, updater):
        self.source, self.config = updater, updater.config
        self.model = copy.deepcopy(updater.model).requires_grad_(False).eval()
        self.tokenizer = copy.deepcopy(updater.tokenizer)  # a fast tokenizer is not safe to share between threads
        self.updates = updater.step  # how many updates the copied weights have seen
        mine, theirs = dict(self.model.named_parameters()), dict(updater.model.named_parameters())
        if mine.keys() != theirs.keys():
            raise ArmsError("--overlap_generation: the policy's copy has other parameters than the policy")
        self.pairs = [(mine[name], tensor) for name, tensor in theirs.items() if tensor.requires_grad]

    @property
    def step(self) -> int:
        return self.updates

    def generate(self, conversations, seed):
        from online_sdpo_updater import OnlineSDPOUpdater

        return OnlineSDPOUpdater.generate(self, conversations, seed=seed)  # reads config, model, tokenizer only

    def refresh(self) -> None:
        import torch

        with torch.no_grad():
            for mine, theirs in self.pairs:
                mine.copy_(theirs)
        self.updates = self.source.step
