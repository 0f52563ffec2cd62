"""``qlx serve``: an OpenAI-compatible HTTP server over a checkpoint.

  qlx serve --ckpt HF_DIR --port 8000                       a Hugging Face Qwen3 / Qwen3-MoE directory
  qlx serve --ckpt runs/stage1 --port 8000 --tokenizer T    a qlx run folder (config.yaml + checkpoints/)

The tokenizer is ``--tokenizer`` (a tokenizer.json, a sentencepiece .model, or a folder holding one); without it, the
checkpoint folder's own tokenizer file, or for a qlx run folder its ``data.tokenizer``. Endpoints: ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (see ``qlx.rollout.protocol`` for the supported fields),
``GET /health``, ``GET /metrics`` (Prometheus). It runs on uvicorn; a request that would push the queue past
``--max-queued-rows`` gets 429 with Retry-After.

``--engine static`` (default) batches the requests that arrive within ``--batch-wait-ms`` and answers each row at the
end of its batch; ``--engine continuous`` runs :class:`qlx.rollout.continuous.ContinuousEngine` (``--max-batch``
paged-KV slots, ``--kv-tokens`` of KV in pages of ``--page-size``): requests join the running batch between bursts
of ``--burst`` decode steps and stream per burst.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from qlx.rollout.protocol import ServeLimits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--ckpt", type=Path, required=True, help="Hugging Face directory or qlx run folder")
    parser.add_argument("--port", type=int, required=True, help="TCP port (0: any free port, printed at start)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json / .model file or folder")
    parser.add_argument("--model-name", help="the model id clients pass (default: the checkpoint folder's name)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="HF weights' dtype")
    parser.add_argument(
        "--max-model-len",
        type=int,
        help="prompt + completion tokens per request (default: 4096, or less if the "
        "model's max_position_embeddings is smaller)",
    )
    parser.add_argument("--max-batch", type=int, default=16, help="rows generated together (and per request)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="wait for more requests before a batch")
    parser.add_argument(
        "--max-queued-rows", type=int, default=256, help="rows waiting for the engine before requests get 429"
    )
    parser.add_argument("--prefill-chunk", type=int, default=512, help="prompt positions per prefill step")
    parser.add_argument(
        "--engine", choices=("static", "continuous"), default="static", help="generation backend (see above)"
    )
    parser.add_argument(
        "--kv-tokens", type=int, help="continuous engine: KV cache tokens (default: --max-batch x --max-model-len)"
    )
    parser.add_argument("--page-size", type=int, default=16, help="continuous engine: tokens per KV page")
    parser.add_argument("--burst", type=int, default=16, help="continuous engine: decode steps between admissions")
    parser.add_argument(
        "--chat-mode",
        choices=("thinking", "instruct", "no_think"),
        default="thinking",
        help="generation prompt of the chat template (see qlx.data.tokenizer)",
    )


def load_model(path: Path, *, dtype: str = "float32"):
    """A model from a Hugging Face directory (``config.json``) or a qlx run folder (``config.yaml`` with
    ``checkpoints/``: the newest usable checkpoint's parameters, :func:`qlx.models.checkpoint_io.load_run_model`)."""
    import qlx
    from qlx.models.checkpoint_io import is_run_folder, load_run_model

    if (path / "config.json").is_file():
        return qlx.load_hf(path, dtype=dtype)
    if not is_run_folder(path):
        raise FileNotFoundError(
            f"--ckpt {path}: neither a Hugging Face directory (config.json) nor a qlx run folder "
            "(config.yaml + checkpoints/)"
        )
    try:
        return load_run_model(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--ckpt {error}") from None


def load_serving_tokenizer(ckpt: Path, tokenizer: Path | None):
    """``--tokenizer``, else a tokenizer file in the checkpoint folder, else a run folder's ``data.tokenizer``."""
    from qlx.data.tokenizer import load_tokenizer
    from qlx.models.checkpoint_io import is_run_folder

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if is_run_folder(ckpt):
        import yaml

        configured = ((yaml.safe_load((ckpt / "config.yaml").read_text()) or {}).get("data") or {}).get("tokenizer")
        if configured:
            return load_tokenizer(configured)
    try:
        return load_tokenizer(ckpt)
    except FileNotFoundError:
        raise FileNotFoundError(f"--ckpt {ckpt} holds no tokenizer.json or .model file; pass --tokenizer") from None


def build_backend(args: argparse.Namespace, model, max_model_len: int):
    """The continuous engine's backend for ``--engine continuous``; None for static (the server builds that one)."""
    if args.engine == "static":
        return None
    from qlx.rollout.backend import ContinuousBackend
    from qlx.rollout.continuous import ContinuousEngine, EngineConfig
    from qlx.rollout.kv_pages import pages_for

    if args.max_batch & (args.max_batch - 1):
        raise ValueError(f"--max-batch must be a power of two with --engine continuous (slots), got {args.max_batch}")
    kv_tokens = args.kv_tokens or args.max_batch * max_model_len
    if kv_tokens < max_model_len:
        raise ValueError(f"--kv-tokens ({kv_tokens}) must hold one whole request (--max-model-len {max_model_len})")
    config = EngineConfig(
        max_slots=args.max_batch,
        page_size=args.page_size,
        num_pages=pages_for(kv_tokens, args.page_size) + 1,
        burst=args.burst,
        max_len=max_model_len,
        prefill_chunk=args.prefill_chunk,
    )
    return ContinuousBackend(ContinuousEngine(model, config), max_rows=args.max_batch)


def build_server(args: argparse.Namespace):
    """The :class:`~qlx.rollout.server.OpenAIServer` the arguments describe (bound, backend running, not serving)."""
    from qlx.rollout.server import OpenAIServer

    model = load_model(args.ckpt, dtype=args.dtype)
    max_model_len = args.max_model_len or min(4096, model.config.max_position_embeddings)
    limits = ServeLimits(max_model_len=max_model_len, max_rows=args.max_batch, max_queued_rows=args.max_queued_rows)
    tokenizer = load_serving_tokenizer(args.ckpt, args.tokenizer)
    return OpenAIServer(
        model,
        tokenizer,
        host=args.host,
        port=args.port,
        model_name=args.model_name or args.ckpt.resolve().name,
        limits=limits,
        chat_mode=args.chat_mode,
        batch_wait_s=args.batch_wait_ms / 1000,
        prefill_chunk=args.prefill_chunk,
        backend=build_backend(args, model, max_model_len),
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        server = build_server(args)
    except (OSError, ValueError) as error:
        print(f"qlx serve: error: {error}", file=sys.stderr)
        return 2
    print(f"qlx serve: model {server.model_name!r} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0
