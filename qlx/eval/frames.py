"""Frames (docs/eval-rules.md §5): 824 multi-hop questions over 2-15 Wikipedia articles.

Data: the processed ``test.jsonl`` with article text (``Tongyi-Zhiwen/frames`` / ModelScope ``iic/frames``: the
Frames columns plus ``wiki_items`` = [{title, text}]), or Google's ``test.tsv`` (no article text: the prompt then
holds no documents, and the loader says so once). Context = ``title + "\\n" + text`` of each article, joined by "\\n".

Scoring: official, the Frames autorater prompt (J-FRAMES) on the stripped response, TRUE/FALSE decision; ql,
max(CEM-strict, J-EQ) on SPELL's extracted answer.
"""

from qlx.eval import qa
from qlx.eval.records import Item, RecordError, find_files, load_records, require
from qlx.eval.scoring import check_protocol, judge_only
from qlx.eval.text import substitute

NAME = "frames"
TASK = "qa"
SPLITS = ("reasoning_type",)
GENERATION = {"official": {"temperature": 0.0, "top_p": 1.0}}
OFFICIAL_TEMPLATE = """Here are the relevant Wikipedia articles:
{context}

Based on all the information, answer the query.

Query: {question}"""


def _item(record, path):
    require(record, {"Prompt": str, "Answer": str})
    items = record.get("wiki_items")
    if items is not None and not (
        isinstance(items, list) and all(isinstance(w, dict) and {"title", "text"} <= set(w) for w in items)
    ):
        raise RecordError("key 'wiki_items' must be a list of {title, text} objects")
    index = record.get("Unnamed: 0", record.get("id", record.get("index")))
    if index is None:
        raise RecordError("missing key 'Unnamed: 0' (the row index)")
    kinds = str(record.get("reasoning_types", "")).split("|")[0].strip() or "unlabelled"
    return Item(NAME, str(index), record, {"reasoning_type": kinds})


def load(root):
    """Items from ``test.jsonl`` (preferred, with article text) or ``test.tsv`` under ``root``."""
    files = find_files(root, ("test.jsonl", "*.jsonl", "test.tsv", "*.tsv"), "Frames")
    jsonl = [f for f in files if f.suffix == ".jsonl"]
    loaded = load_records(jsonl or files, NAME, _item)
    if not jsonl:
        loaded.notes.append(f"{files[0]}: Google's test.tsv has no article text; prompts hold the question only")
    return loaded


def context(record):
    return "\n".join(f"{w['title']}\n{w['text']}" for w in record.get("wiki_items") or [])


def messages(record, protocol):
    """official: the oracle setting (articles, then the query); ql: SPELL's reading prompt."""
    check_protocol(protocol)
    if protocol == "official":
        values = {"{context}": context(record), "{question}": record["Prompt"]}
        return [{"role": "user", "content": substitute(OFFICIAL_TEMPLATE, values)}]
    return qa.ql_messages(context(record), record["Prompt"])


extract = qa.extract


def memory_inputs(record, protocol):
    """(articles, query, format line) for the memory agent, in both protocols."""
    check_protocol(protocol)
    return qa.memory_inputs(context(record), record["Prompt"])


def score(response, record, protocol="ql", judge=None, parser=None):
    extracted = extract(response, protocol)
    if protocol == "official":
        return judge_only(extracted, record["Prompt"], record["Answer"], judge, parser or "frames", NAME)
    return qa.ql_score(extracted, record["Prompt"], record["Answer"], judge, parser)
