"""Personal-data redaction for everything that is stored or logged (transcripts, hand-off tickets, log lines).

Covers e-mail addresses, Swedish personal identity numbers (personnummer / samordningsnummer, 10 or 12 digits,
with `-`/`+` or no separator) and phone numbers (Swedish and international forms). The model still sees the
user's own words for the current turn; only what is written down is redacted.
"""

from __future__ import annotations

import re

EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+", re.UNICODE)
# 19811218-9876, 811218-9876, 198112189876, 8112189876, 811218+9876; month 01-12, day 01-31 (+60 samordningsnummer).
PERSONNUMMER = re.compile(
    r"(?<![\d-])(?:19|20)?\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]|6[1-9]|[78]\d|9[01])[-+]?\d{4}(?![\d-])"
)
# +46 70 123 45 67, 0046-70-1234567, 070-123 45 67, 08-123 456 78, (555) 123-4567, +1 555 123 4567.
PHONE = re.compile(r"(?<![\w+])(?:\+|00)?\(?\d{1,4}\)?(?:[ .\-/]?\(?\d{1,4}\)?){2,6}(?!\w)")

EMAIL_TOKEN = "[EMAIL]"
PNR_TOKEN = "[PERSONNUMMER]"
PHONE_TOKEN = "[PHONE]"


def _phone(match: re.Match[str]) -> str:
    digits = sum(ch.isdigit() for ch in match.group(0))
    # Short number runs are years, prices, paragraph numbers ("9 kap. 4 §", "2019", "1.8"): keep them.
    if digits < 8 or digits > 15:
        return match.group(0)
    text = match.group(0)
    # A plain decimal ("3.6") or a date-like "2024-01-15" is not a phone number.
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return text
    return PHONE_TOKEN


def redact(text: str) -> str:
    """Replace personal data in `text` with placeholder tokens; idempotent."""
    if not text:
        return text
    text = EMAIL.sub(EMAIL_TOKEN, text)
    text = PERSONNUMMER.sub(PNR_TOKEN, text)
    return PHONE.sub(_phone, text)


def redact_obj(value):
    """Redact every string inside nested dicts/lists (for transcripts and structured log records)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_obj(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_obj(v) for v in value]
    return value
