"""One tokenizer interface over a Hugging Face ``tokenizer.json`` or a sentencepiece model, with the Qwen chat template.

``load_tokenizer(path)`` returns a :class:`Tokenizer`; ``train_bpe_tokenizer(texts)`` builds a tiny byte-level BPE with
the Qwen pre-tokenizer and special tokens (used by tests, the demo and benchmarks, so nothing is downloaded).

The chat template is Qwen's ChatML (``<|im_start|>role\\n...<|im_end|>\\n``) with Qwen3's handling of thinking:
an assistant turn after the last user query keeps its reasoning as ``<think>\\n...\\n</think>\\n\\n``; earlier turns
drop it. The generation prompt is ``<|im_start|>assistant\\n`` followed by, per ``mode``:

- ``"thinking"`` (Qwen3-*-Thinking-2507, the recipe's base model): ``<think>\\n``
- ``"instruct"`` (Qwen3-*-Instruct-2507, or hybrid Qwen3 with thinking on): nothing
- ``"no_think"`` (hybrid Qwen3 with ``enable_thinking=False``): ``<think>\\n\\n</think>\\n\\n``
"""

import abc
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
THINK, THINK_END = "<think>", "</think>"
QWEN_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
QWEN_ADDED_TOKENS = (THINK, THINK_END)
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_MODES = ("thinking", "instruct", "no_think")
_ROLES = ("system", "user", "assistant")


def render_chat(messages: Sequence[dict], *, add_generation_prompt: bool = False, mode: str = "thinking") -> str:
    """Render ``[{"role", "content"[, "reasoning_content"]}]`` with the Qwen3 ChatML template (see module doc)."""
    if mode not in CHAT_MODES:
        raise ValueError(f"chat mode {mode!r} is not one of {CHAT_MODES}")
    for i, message in enumerate(messages):
        if message.get("role") not in _ROLES:
            raise ValueError(f"messages[{i}].role is {message.get('role')!r}; expected one of {_ROLES}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")
    last_query = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    parts = []
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role != "assistant":
            parts.append(f"{IM_START}{role}\n{content}{IM_END}\n")
            continue
        reasoning = message.get("reasoning_content")
        if reasoning is None:
            reasoning = ""
            if THINK_END in content:
                reasoning = content.split(THINK_END)[0].rstrip("\n").split(THINK)[-1].lstrip("\n")
                content = content.split(THINK_END)[-1].lstrip("\n")
        if i > last_query and (i == len(messages) - 1 or reasoning):
            reasoning, content = reasoning.strip("\n"), content.lstrip("\n")
            body = f"{THINK}\n{reasoning}\n{THINK_END}\n\n{content}"
        else:
            body = content
        parts.append(f"{IM_START}assistant\n{body}{IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
        parts.append({"thinking": f"{THINK}\n", "instruct": "", "no_think": f"{THINK}\n\n{THINK_END}\n\n"}[mode])
    return "".join(parts)


class Tokenizer(abc.ABC):
    """Encode/decode text, look up special tokens, apply the Qwen chat template, save to a directory."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in the text map to their single ids; no BOS/EOS added."""

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, in parallel where the backend can."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str: ...

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None: ...

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer into ``directory`` (created if needed); returns the file written."""

    def count_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Token counts ``[N]`` (int64) of ``texts``."""
        return np.fromiter((len(ids) for ids in self.encode_batch(texts)), dtype=np.int64, count=len(texts))

    def special_id(self, token: str) -> int:
        """Id of a special token; a clear error when this vocabulary lacks it."""
        token_id = self.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in this tokenizer's vocabulary")
        return token_id

    @property
    def im_start_id(self) -> int:
        return self.special_id(IM_START)

    @property
    def im_end_id(self) -> int:
        """``<|im_end|>``: the end-of-turn token, Qwen's EOS for chat."""
        return self.special_id(IM_END)

    @property
    def eos_id(self) -> int:
        return self.im_end_id

    @property
    def pad_id(self) -> int:
        """``<|endoftext|>``, Qwen's pad token."""
        return self.special_id(ENDOFTEXT)

    @property
    def think_id(self) -> int:
        return self.special_id(THINK)

    @property
    def think_end_id(self) -> int:
        return self.special_id(THINK_END)

    def apply_chat_template(
        self, messages: Sequence[dict], *, add_generation_prompt: bool = False, mode: str = "thinking"
    ) -> list[int]:
        """Ids of :func:`render_chat` (the same ids as transformers' ``apply_chat_template`` with Qwen's template)."""
        return self.encode(render_chat(messages, add_generation_prompt=add_generation_prompt, mode=mode))


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (``tokenizer.json``)."""

    def __init__(self, backend):
        self.backend = backend
        self._encode_fast = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._encode_fast(list(texts), add_special_tokens=False)]

    def count_batch(self, texts: Sequence[str]) -> np.ndarray:
        encodings = self._encode_fast(list(texts), add_special_tokens=False)
        return np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(texts))

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and their character spans ``(start, end)`` in ``text``."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path))
        return path


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model; ChatML/thinking strings that are pieces of the model are split out as single ids."""

    def __init__(self, processor):
        self.processor = processor
        specials = [t for t in (*QWEN_SPECIAL_TOKENS, *QWEN_ADDED_TOKENS) if self.token_to_id(t) is not None]
        specials.sort(key=len, reverse=True)
        self._special_ids = {t: processor.piece_to_id(t) for t in specials}
        self._split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.processor.encode(text)
        ids: list[int] = []
        for segment in self._split.split(text):
            if segment in self._special_ids:
                ids.append(self._special_ids[segment])
            elif segment:
                ids.extend(self.processor.encode(segment))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        pieces: list[str] = []
        run: list[int] = []
        special_by_id = {v: k for k, v in self._special_ids.items()}
        for token_id in ids:
            if token_id in special_by_id:
                pieces.append(self.processor.decode(run))
                run = []
                if not skip_special_tokens:
                    pieces.append(special_by_id[token_id])
            else:
                run.append(int(token_id))
        pieces.append(self.processor.decode(run))
        return "".join(pieces)

    def token_to_id(self, token: str) -> int | None:
        token_id = self.processor.piece_to_id(token)
        return (
            None if token_id == self.processor.unk_id() and token != self.processor.id_to_piece(token_id) else token_id
        )

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "tokenizer.model"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.processor.serialized_model_proto())
        return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizer.json`` / sentencepiece ``.model`` file, or a directory holding one (``tokenizer.json`` first).

    A missing file raises FileNotFoundError, an unreadable or corrupt one ValueError naming it."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "tokenizer.json", path / "tokenizer.model", *sorted(path.glob("*.model"))]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{path}: no tokenizer.json or sentencepiece .model file in this directory")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer file not found")
    if path.suffix not in (".json", ".model"):
        raise ValueError(f"{path}: expected a tokenizer.json or a sentencepiece .model file")
    try:
        if path.suffix == ".json":
            import tokenizers

            return HFTokenizer(tokenizers.Tokenizer.from_file(str(path)))
        import sentencepiece

        return SentencePieceTokenizer(sentencepiece.SentencePieceProcessor(model_file=str(path)))
    except Exception as e:  # noqa: BLE001 - both libraries raise plain Exception / RuntimeError on a corrupt file
        raise ValueError(f"{path}: not a valid tokenizer file ({e})") from None


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int = 2048, min_frequency: int = 2) -> HFTokenizer:
    """A byte-level BPE trained on ``texts`` with Qwen's pre-tokenizer, specials and ``<think>``/``</think>``.

    Deterministic for the same texts; takes well under a second for a few hundred KB of text.
    """
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.add_tokens(list(QWEN_ADDED_TOKENS))
    return HFTokenizer(backend)
