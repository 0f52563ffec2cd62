"""Optional seqio adapter (``pip install qlx[seqio]``, which brings TensorFlow): records as a seqio Task for
T5X-style pipelines. ``inputs`` is the single-pass QA prompt (context included), ``targets`` the answer."""

from collections.abc import Sequence
from pathlib import Path

from qlx.data.prompts import user_prompt
from qlx.data.records import read_context, read_jsonl


def _examples(files: Sequence[str | Path]):
    for path in files:
        for record in read_jsonl(path):
            context = read_context(record, Path(path).parent)
            yield {
                "inputs": user_prompt(record.question, context, record.options),
                "targets": record.answer,
                "task_type": record.task_type,
                "id": record.id,
            }


def register_seqio_task(name: str, split_files: dict[str, Sequence[str | Path]], vocabulary):
    """Register (or replace) seqio task ``name`` over JSONL record files per split (``{"train": [...], ...}``);
    ``vocabulary`` is a ``seqio.Vocabulary`` (e.g. ``seqio.SentencePieceVocabulary(path)``). Returns the task."""
    import seqio
    import tensorflow as tf

    features = ("inputs", "targets", "task_type", "id")

    def dataset_fn(split: str, shuffle_files: bool, seed=None):
        return tf.data.Dataset.from_generator(
            lambda: _examples(split_files[split]),
            output_signature={k: tf.TensorSpec(shape=(), dtype=tf.string) for k in features},
        )

    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn=dataset_fn, splits=list(split_files)),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features={
            "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=False),
            "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
        },
        metric_fns=[],
    )
