"""Masking of secrets in anything written or printed (config.json, --print_config).

A value is masked when its key is a known secret name (api_key, hf_token, ...; also as the end of
a longer name such as wandb_api_key or db_password) or when the value itself looks like a
credential (an Anthropic or Hugging Face key, a long key-like string). Keys that merely contain
"token" (max_new_tokens, max_prompt_tokens) are settings and stay visible: the resume check
compares them.
"""
from __future__ import annotations

import re

MASK = "***"
SECRET_KEY_NAMES = ("api_key", "apikey", "hf_token", "access_token", "auth_token", "token", "secret",
                    # auth: the web chat logins
                    "client_secret", "password", "passwd", "credentials", "auth", "auth_file")
_SECRET_KEY = re.compile(r"(^|_)(" + "|".join(SECRET_KEY_NAMES) + r")$")
_SECRET_VALUE = re.compile(
    r"^(sk-ant-[A-Za-z0-9_-]{8,}"     # Anthropic
    r"|sk-[A-Za-z0-9_-]{20,}"         # OpenAI-style
    r"|hf_[A-Za-z0-9]{20,}"           # Hugging Face
    r"|gh[pousr]_[A-Za-z0-9]{20,}"    # GitHub
    r"|xox[abpr]-[A-Za-z0-9-]{20,}"   # Slack
    r")$")
# Not matched: bare hex strings (a W&B key looks like a sha1), because configs carry data hashes
# that the resume check compares; W&B keys are caught by their field name instead.


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key.lower()))


def looks_like_secret(value) -> bool:
    return isinstance(value, str) and bool(_SECRET_VALUE.match(value.strip()))


def mask_value(key: str, value):
    if value and is_secret_key(key):  # the whole value, a list of logins included
        return MASK
    if isinstance(value, dict):
        return public_config(value)
    if isinstance(value, (list, tuple)):
        return [mask_value(key, item) for item in value]
    if value and (is_secret_key(key) or looks_like_secret(value)):
        return MASK
    return value


def public_config(values: dict) -> dict:
    """A config dict safe to write or print: secret fields and secret-looking values masked."""
    return {key: mask_value(str(key), value) for key, value in values.items()}
