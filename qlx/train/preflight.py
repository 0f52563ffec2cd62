"""Checks a training config against the data, tokenizer, devices and starting point before any compute starts.

Every failure raises :class:`qlx.config.ConfigError` naming the key (``data.train_files[1]: file not found: ...``),
or the file and line of a bad record.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import yaml

from qlx.config import ARCHITECTURE_KEYS, Config, ConfigError
from qlx.mesh import resolve_sizes
from qlx.train.inputs import Dataset, PromptBuilder, load_records


@dataclasses.dataclass
class Prepared:
    """What the checks loaded: the dataset (records, prompt builder, task types) and the tokenizer."""

    dataset: Dataset
    tokenizer: object


def _architecture_mismatch(ours, theirs: dict) -> list[str]:
    def norm(value):
        return list(value) if isinstance(value, tuple | list) else value

    return [
        f"{key}={norm(theirs[key])!r} (config: {norm(getattr(ours, key))!r})"
        for key in ARCHITECTURE_KEYS
        if key in theirs and norm(theirs[key]) != norm(getattr(ours, key))
    ]


def _check_init_from(config: Config) -> None:
    source = config.train.init_from
    if source is None:
        return
    path = Path(source)
    key = "train.init_from"
    if not path.exists():
        raise ConfigError(key, f"{path} does not exist")
    if (path / "config.json").is_file():
        from qlx.models.hf import config_from_hf

        hf = config_from_hf(json.loads((path / "config.json").read_text()), source=str(path / "config.json"))
        theirs = {k: getattr(hf, k) for k in ARCHITECTURE_KEYS}
    elif (path / "config.yaml").is_file():
        theirs = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("model", {})
    else:
        theirs = {}
    if not ((path / "config.json").is_file() or (path / "checkpoints").is_dir() or any(path.glob("[0-9]*"))):
        raise ConfigError(key, f"{path} is neither a Hugging Face model folder nor a qlx run or checkpoint folder")
    mismatch = _architecture_mismatch(config.model, theirs)
    if mismatch:
        raise ConfigError(key, f"{path} holds a different architecture: {', '.join(mismatch)}")


def _check_prompt_template(config: Config, records: list, tokenizer) -> None:
    """data.max_input_tokens must hold every record's prompt without its context (chat template, question, options)
    plus two context tokens (the head and tail that middle truncation keeps)."""
    from qlx.data.prompts import chat_pieces

    pieces = [chat_pieces(r.question, r.options, mode=config.data.chat_mode) for r in records]
    counts = tokenizer.count_batch([before for before, _ in pieces]) + tokenizer.count_batch([a for _, a in pieces])
    worst = int(np.argmax(counts))
    needed = int(counts[worst]) + 2
    if needed > config.data.max_input_tokens:
        raise ConfigError(
            "data.max_input_tokens",
            f"{config.data.max_input_tokens} is too small: the prompt of record {records[worst].id} takes "
            f"{int(counts[worst])} tokens without its context (chat template, question, options); need at least "
            f"{needed}",
        )


def _check_memory_window(config: Config, tokenizer) -> None:
    """Every turn of the memory agent (template + question + memory + chunk + generation cap) must fit the model."""
    from qlx.config import memory_agent_config
    from qlx.memory.agent import turn_plans
    from qlx.memory.templates import tokenize_template

    agent = memory_agent_config(config)
    try:
        template = tokenize_template(tokenizer, agent.memory_template, agent.chat_mode)
        turn_plans(template, agent, config.model.max_position_embeddings)
    except ValueError as e:
        raise ConfigError("memory", str(e)) from None


def preflight(config: Config) -> Prepared:
    """Validate ``config`` for ``qlx train`` and load the data; raises ConfigError naming what is wrong."""
    data, train = config.data, config.train
    if not data.train_files:
        raise ConfigError("data.train_files", "no training files given")
    for i, name in enumerate(data.train_files):
        if not Path(name).is_file():
            raise ConfigError(f"data.train_files[{i}]", f"file not found: {name}")
    if not data.tokenizer:
        raise ConfigError("data.tokenizer", "no tokenizer given (a tokenizer.json, .model file or a folder)")
    from qlx.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(data.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError("data.tokenizer", str(e)) from None
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"{config.model.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size})",
        )
    try:
        tokenizer.eos_id, tokenizer.pad_id  # noqa: B018 -- both must exist
    except KeyError as e:
        raise ConfigError("data.tokenizer", f"{e.args[0]} (needed as end-of-turn and padding token)") from None
    limit = data.max_input_tokens + data.max_output_tokens
    if limit > config.model.max_position_embeddings:
        raise ConfigError(
            "data.max_input_tokens",
            f"max_input_tokens + max_output_tokens = {limit} exceeds model.max_position_embeddings "
            f"({config.model.max_position_embeddings})",
        )
    try:
        resolve_sizes(config.mesh.sizes(), jax.device_count())
    except ValueError as e:
        raise ConfigError("mesh", str(e)) from None
    if train.mode == "rl":
        sequences = train.batch_size * config.rl.group_size
        if train.micro_batch_size > sequences:
            raise ConfigError(
                "train.micro_batch_size",
                f"{train.micro_batch_size} exceeds the {sequences} sequences of a step (batch_size x group_size)",
            )
        if sequences % config.rl.updates_per_batch:
            raise ConfigError(
                "rl.updates_per_batch",
                f"must divide the {sequences} sequences of a step (batch_size x group_size)",
            )
    _check_init_from(config)
    try:
        records, folders = load_records(data.train_files)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError("data.train_files", str(e)) from None
    if not records:
        raise ConfigError("data.train_files", "the files hold no records")
    task_types = data.task_types or tuple(sorted({r.task_type for r in records}))
    if train.mode in ("rl", "memory"):
        from qlx.rl.rewards import VERIFIERS

        missing = [t for t in task_types if t not in VERIFIERS]
        if missing:
            raise ConfigError("data.task_types", f"no reward verifier for {missing}; known: {sorted(VERIFIERS)}")
    _check_prompt_template(config, records, tokenizer)
    if train.mode == "memory":
        _check_memory_window(config, tokenizer)
    builder = PromptBuilder(tokenizer, max_input_tokens=data.max_input_tokens, chat_mode=data.chat_mode)
    try:
        dataset = Dataset(records, folders, builder, task_types)
    except ValueError as e:
        raise ConfigError("data.task_types", str(e)) from None
    return Prepared(dataset=dataset, tokenizer=tokenizer)
