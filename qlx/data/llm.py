"""The LLM endpoint of synthesis (filters, the proposer-solver-verifier engine, fact extraction): the names the data
layer has always used, on the project's one OpenAI client (:mod:`qlx.openai_client`).

``LLMConfig.from_env()`` reads ``QLX_LLM_URL`` (the base URL, e.g. ``http://127.0.0.1:8000/v1``), ``QLX_LLM_MODEL`` and
``QLX_LLM_API_KEY`` (falling back to ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``).
"""

from qlx.openai_client import ClientConfig as LLMConfig
from qlx.openai_client import LLMError, parse_json_reply
from qlx.openai_client import OpenAIClient as ChatClient

__all__ = ["ChatClient", "LLMConfig", "LLMError", "parse_json_reply"]
