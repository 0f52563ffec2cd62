"""LLM judge: asks an OpenAI-compatible chat-completions endpoint whether two answers are equivalent.

The one place in ``qlx.rl`` that does I/O, through the project's one client (:mod:`qlx.openai_client`, which imports
only ``openai``). Connection errors, timeouts, HTTP 429/5xx and malformed replies are retried; when the endpoint
keeps failing (or answers another HTTP error) the judge returns None with a logged warning, so the caller keeps the
rule's verdict.
"""

import dataclasses
import logging

from qlx.openai_client import ClientConfig, LLMError, OpenAIClient

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You check whether two answers to the same problem are equivalent. Do not solve the problem yourself: decide "
    "only whether Answer 1 and Answer 2 state the same value or meaning, allowing for different wording, units "
    "written differently, or different notation. First explain your reasoning briefly, then end with exactly "
    "[[YES]] if they are equivalent or [[NO]] if they are not."
)
USER_TEMPLATE = "Problem: {question}\n\nAnswer 1: {pred}\n\nAnswer 2: {gold}"


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """base_url: the server root that holds ``/chat/completions`` (e.g. "http://127.0.0.1:8000/v1").
    timeout: seconds per request; retries: extra attempts after the first; backoff: seconds before retry k, times
    2^k; max_answer_chars: longer answers are cut before they are sent."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 2
    backoff: float = 1.0
    temperature: float = 0.0
    max_tokens: int = 1024
    max_answer_chars: int = 4000

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"JudgeConfig.base_url must start with http:// or https://, got {self.base_url!r}")
        if not self.model:
            raise ValueError("JudgeConfig.model must be a non-empty model name")
        if self.timeout <= 0 or self.retries < 0 or self.backoff < 0 or self.max_answer_chars < 1:
            raise ValueError(
                f"JudgeConfig needs timeout > 0, retries >= 0, backoff >= 0, max_answer_chars >= 1; got {self}"
            )


def parse_verdict(reply):
    """True/False from the last [[YES]]/[[NO]] tag; without a tag, True iff the reply contains "YES"."""
    yes, no = reply.rfind("[[YES]]"), reply.rfind("[[NO]]")
    if yes >= 0 or no >= 0:
        return yes > no
    return "YES" in reply


class Judge:
    """``Judge(config).equivalent(question, pred, gold)`` → True / False, or None when the endpoint failed."""

    def __init__(self, config):
        self.config = config
        self.client = OpenAIClient(
            ClientConfig(
                config.base_url,
                config.model,
                config.api_key,
                timeout_s=config.timeout,
                max_retries=config.retries,
                backoff_s=config.backoff,
            )
        )

    def equivalent(self, question, pred, gold):
        cfg = self.config
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {
                "role": "user",
                "content": USER_TEMPLATE.format(
                    question=question, pred=pred[: cfg.max_answer_chars], gold=gold[: cfg.max_answer_chars]
                ),
            },
        ]
        try:
            reply = self.client.chat(messages, temperature=cfg.temperature, max_tokens=cfg.max_tokens)
        except LLMError as error:  # any failure degrades to the rule verdict
            log.warning("judge failed %d times (%s); keeping the rule verdict", error.attempts, error)
            return None
        return parse_verdict(reply)
