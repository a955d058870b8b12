"""The one place that knows every kind of simulated user and style judge, and builds them.

    factory = FeedbackFactory(dtype="auto", device="auto", api_concurrency=8)
    user = factory.user("rule" | "local" | "claude" | "vllm" | "neutral", style, model, seed=...)
    judges = factory.judges("local", ["concise", "no_emojis"], model)   # {style: judge}

A factory loads each model once: every judge of a run, and a user with the same model, share
one loaded (model, tokenizer) pair, one vLLM engine or one Claude client. The module-level
`make_user_simulator` / `make_judge` build a single component with a fresh factory.

The base modules (user_simulator.py, style_judge.py) never import their Claude or vLLM
subclasses; only this module does, lazily, so `anthropic` and `vllm` stay optional.
"""
from __future__ import annotations

from auxiliary.feedback.personas import get_persona

USER_SIMULATOR_KINDS = ("rule", "local", "claude", "vllm", "neutral")
JUDGE_KINDS = ("rule", "local", "claude", "vllm")
CLIENT_KEYWORDS = ("max_retries", "timeout_s", "base_url", "api_key", "initial_backoff_s", "max_backoff_s")


def model_for_kind(kind: str, name: str | None):
    """The model to build a `kind` component on: none for rule; Claude components take only a Claude model id
    (a default user/judge model such as a Qwen is not one, so the default Claude is used)."""
    if kind == "rule":
        return None
    if kind == "claude":
        return name if name and name.startswith("claude") else None
    return name


def check_styles(styles) -> None:
    """Every style names a persona (else personas.UnknownStyleError, listing the known styles), checked
    before a model, engine or client is made for a component. The components' base classes check their
    own style too (personas.PersonaStyle) for callers that build one directly; this check exists because
    the factory loads the model before the component is built."""
    for style in styles:
        get_persona(style)


def _check_kind(kind: str, kinds: tuple[str, ...], what: str) -> None:
    if kind not in kinds:
        raise ValueError(f"unknown {what} kind {kind!r}; choose one of {', '.join(kinds)}")


class FeedbackFactory:
    """Builds users and judges; loaded models, vLLM engines and Claude clients are shared by name."""

    def __init__(self, dtype: str = "auto", device: str = "auto", api_concurrency: int = 8,
                 api_options: dict | None = None, vllm_options: dict | None = None, placement=None):
        self.dtype, self.device, self.api_concurrency = dtype, device, api_concurrency
        # FeedbackPlacementOptions / JudgePlacementOptions (or None): which GPUs a vLLM user / judge takes
        self.placement = placement
        self.api_options = dict(api_options or {})    # ClaudeClient keywords (max_retries, timeout_s, ...)
        self.vllm_options = dict(vllm_options or {})  # vllm.LLM keywords (gpu_memory_utilization, ...)
        self._local: dict = {}
        self._engines: dict = {}
        self._clients: dict = {}

    # ------------------------------------------------------------------ shared resources
    def local_model(self, model_name_or_path):
        """(model, tokenizer), loaded once per name; an already loaded pair passes through."""
        from auxiliary.feedback.user_simulator import load_local_model

        if isinstance(model_name_or_path, (tuple, list)):
            return load_local_model(model_name_or_path, self.dtype, self.device)
        key = str(model_name_or_path)
        if key not in self._local:
            self._local[key] = load_local_model(model_name_or_path, self.dtype, self.device)
        return self._local[key]

    def vllm_engine(self, model_name_or_path, seed: int = 0, **options):
        """One vllm.LLM per model name and placement (user and judge on the same model and GPUs share it)."""
        from auxiliary.runtime.vllm_adapter import import_vllm, make_llm

        merged = {"gpu_memory_utilization": 0.4, "tensor_parallel_size": 1, "gpu_start": None,
                  **self.vllm_options, **{k: v for k, v in options.items() if v is not None}}
        gpu_share, tp, start = (merged.pop(k) for k in ("gpu_memory_utilization", "tensor_parallel_size", "gpu_start"))
        key = (str(model_name_or_path), tp, start)  # another placement of the same model is another engine
        if key not in self._engines:
            self._engines[key] = make_llm(import_vllm(), model_name_or_path, gpu_share, tp, seed, gpu_start=start,
                                          **merged)
        return self._engines[key]

    def _placement(self, role: str, model_name_or_path) -> dict:
        """vllm.LLM placement keywords of a vLLM user or judge. A judge with no placement of its own on
        the user's model shares the user's engine (the paper's runs: one Qwen3-32B engine for both)."""
        p = self.placement
        if p is None:
            return {}
        if role == "judge" and (p.judge_vllm_tp is not None or p.judge_vllm_gpu_start is not None):
            return {"tensor_parallel_size": p.judge_vllm_tp or 1, "gpu_start": p.judge_vllm_gpu_start}
        user = {"tensor_parallel_size": getattr(p, "user_vllm_tp", 1),
                "gpu_start": getattr(p, "user_vllm_gpu_start", None)}
        if role == "user" or str(model_name_or_path) == str(getattr(p, "user_model_name_or_path", None)):
            return user
        return {}

    def claude_client(self, model: str | None, role: str, seed: int | None = None, **options):
        """One client per (role, model): the judges of all styles share one, the user has its own
        (so each role's request and retry counts stay apart in the run's log)."""
        from auxiliary.feedback.claude_client import DEFAULT_MODEL, ClaudeClient

        key = (role, model or DEFAULT_MODEL)
        if key not in self._clients:
            self._clients[key] = ClaudeClient(model=key[1], max_concurrency=self.api_concurrency, seed=seed,
                                              **{**self.api_options, **options})
        return self._clients[key]

    # ------------------------------------------------------------------ components
    def user(self, kind: str, style: str, model_name_or_path=None, seed: int = 0, **kw):
        from auxiliary.feedback.user_simulator import LocalHFUserSimulator, NeutralUserSimulator, RuleBasedUserSimulator

        _check_kind(kind, USER_SIMULATOR_KINDS, "user simulator")
        if kind == "neutral":
            return NeutralUserSimulator(seed=seed, **kw)
        check_styles([style])
        if kind == "rule":
            return RuleBasedUserSimulator(style, seed=seed, **kw)
        if kind == "local":
            return LocalHFUserSimulator(self.local_model(model_name_or_path), style, seed=seed, **kw)
        if kind == "claude":
            from auxiliary.feedback.claude_user_simulator import ClaudeUserSimulator

            client = kw.pop("client", None) or self.claude_client(model_name_or_path, "user", seed=seed,
                                                                   **kw.pop("client_kwargs", {}))
            return ClaudeUserSimulator(style, client=client, seed=seed, **kw)
        from auxiliary.feedback.vllm_user_simulator import VLLMUserSimulator

        llm = kw.pop("llm", None) or self.vllm_engine(model_name_or_path, seed,
                                                      **{**self._placement("user", model_name_or_path),
                                                         **_engine_options(kw)})
        return VLLMUserSimulator(model_name_or_path, style, seed=seed, llm=llm, **kw)

    def judge(self, kind: str, style: str, model_name_or_path=None, **kw):
        from auxiliary.feedback.style_judge import LocalHFJudge, RuleBasedJudge

        _check_kind(kind, JUDGE_KINDS, "judge")
        check_styles([style])
        if kind == "rule":
            return RuleBasedJudge(style, **kw)
        if kind == "local":
            return LocalHFJudge(self.local_model(model_name_or_path), style, **kw)
        if kind == "claude":
            from auxiliary.feedback.claude_style_judge import ClaudeStyleJudge

            client = kw.pop("client", None) or self.claude_client(model_name_or_path, "judge", seed=kw.get("seed"),
                                                                   **kw.pop("client_kwargs", {}))
            return ClaudeStyleJudge(style, client=client, **kw)
        from auxiliary.feedback.vllm_style_judge import VLLMStyleJudge

        llm = kw.pop("llm", None) or self.vllm_engine(model_name_or_path, kw.get("seed", 0),
                                                      **{**self._placement("judge", model_name_or_path),
                                                         **_engine_options(kw)})
        return VLLMStyleJudge(model_name_or_path, style, llm=llm, **kw)

    def judges(self, kind: str, styles, model_name_or_path=None, **kw) -> dict:
        """One judge per style, all on one loaded model / engine / client."""
        check_styles(styles)  # every style, before the first judge's model loads
        return {style: self.judge(kind, style, model_name_or_path, **kw) for style in styles}


def judge_options(kind: str, framing: str | None = None, temperature: float | None = None,
                  max_new_tokens: int | None = None, tie_margin: float | None = None, **extra) -> dict:
    """The run's judge settings as the keywords of `kind`'s class (None: the class default)."""
    if kind == "rule":
        return {}
    names = {"framing": framing, "temperature": temperature,
             ("max_tokens" if kind == "claude" else "max_new_tokens"): max_new_tokens}
    if kind == "local":
        names["tie_margin"] = tie_margin
    return {**{k: v for k, v in names.items() if v is not None}, **extra}


def user_options(kind: str, temperature: float | None = None) -> dict:
    """The run's user settings as the keywords of `kind`'s class (None: the class default)."""
    return {"temperature": temperature} if kind in ("local", "claude", "vllm") and temperature is not None else {}


def _engine_options(kw: dict) -> dict:
    """Pop the vllm.LLM keywords out of a component's keyword arguments."""
    return {name: kw.pop(name) for name in ("gpu_memory_utilization", "tensor_parallel_size", "gpu_start")
            if name in kw}


def _single_use_factory(api_concurrency: int, kw: dict) -> FeedbackFactory:
    """A fresh factory for one component; pops its own keywords (dtype, device, Claude client options) from kw."""
    client_kwargs = {k: kw.pop(k) for k in CLIENT_KEYWORDS if k in kw}
    return FeedbackFactory(kw.pop("dtype", "auto"), kw.pop("device", "auto"), api_concurrency, client_kwargs)


def make_user_simulator(kind: str, style: str, model_name_or_path=None, seed: int = 0, api_concurrency: int = 8,
                        **kw):
    """A single simulated user (a fresh FeedbackFactory: nothing shared)."""
    return _single_use_factory(api_concurrency, kw).user(kind, style, model_name_or_path, seed=seed, **kw)


def make_judge(kind: str, style: str, model_name_or_path=None, api_concurrency: int = 8, **kw):
    """A single judge (a fresh FeedbackFactory: nothing shared)."""
    return _single_use_factory(api_concurrency, kw).judge(kind, style, model_name_or_path, **kw)
