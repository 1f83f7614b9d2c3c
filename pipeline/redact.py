"""Credentials inside URLs, removed from any text before it is recorded or shown.

    redact_urls("sift generate --base-url http://u:pw@host:8000/v1?api_key=sk-1&x=2")
    -> "sift generate --base-url http://***@host:8000/v1?api_key=***&x=2"

A URL may carry a secret in its user-info (`user:password@`) or in a query or fragment parameter
(`?api_key=...`, `&sig=...`, `#access_token=...`). The manifest, the report, error messages and
log lines all pass through `redact_urls`, so a base URL given on the command line or in a teachers
file is never written or printed with its credentials. Pure string functions: applying them twice
gives the same text.
"""

from __future__ import annotations

import re

MASK = "***"
# words that make a query parameter a secret: its name is split on non-letters and camel case
# ("X-Amz-Signature" -> x, amz, signature; "apiKey" -> api, key); `code` is Azure Functions' key
SECRET_PARAM_WORDS = frozenset({
    "key", "keys", "apikey", "token", "tokens", "accesstoken", "secret", "password", "passwd", "pwd", "pass",
    "passphrase", "sig", "signature", "credential", "credentials", "auth", "authorization", "bearer", "jwt",
    "session", "sessionid", "code", "private", "privatekey", "cookie"})
# scheme://authority then the rest of the URL, up to whitespace, quotes or angle brackets
URL = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<authority>[^/?#\s\"'<>`]*)(?P<rest>[^\s\"'<>`]*)")
PARAM = re.compile(r"(?P<sep>[?&;#])(?P<name>[^=&;#?\s]+)=(?P<value>[^&;#\s]*)")


def is_secret_param(name: str) -> bool:
    """Whether a URL parameter named `name` holds a credential (api_key, api-key, apikey, key, token,
    access_token, sig, signature, password, secret, X-Amz-Credential, ...)."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    words = re.findall(r"[a-z0-9]+", spaced.lower())
    joined = "".join(words)
    return bool(words) and (joined in SECRET_PARAM_WORDS or any(w in SECRET_PARAM_WORDS for w in words))


def _params(rest: str) -> str:
    def mask(m: re.Match[str]) -> str:
        if not is_secret_param(m["name"]) or not m["value"]:
            return m[0]
        return f"{m['sep']}{m['name']}={MASK}"

    return PARAM.sub(mask, rest)


def redact_urls(text: str) -> str:
    """`text` with every URL in it redacted (see the module docstring); text without URLs is unchanged."""
    if "://" not in text:
        return text

    def one(m: re.Match[str]) -> str:
        authority = m["authority"]
        if "@" in authority:
            authority = MASK + "@" + authority.rsplit("@", 1)[1]
        return m["scheme"] + authority + _params(m["rest"])

    return URL.sub(one, text)
