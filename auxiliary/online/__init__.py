"""The parts of the online recipe (eval_online_sdpo.py), each feature in a module of its own: world (the
processes), arms (the policies, placebo, per-user adapters, side by side), answers (a batch's replies and
follow-ups, answering ahead), records (metrics rows), evaluator (baseline, evaluations, summary)."""
