"""Safetensors headers are validated before any tensor byte is read: forged headers get a SafetensorsError naming the
file and tensor (the ``safetensors`` library refuses the same files), and ``qlx serve`` / ``qlx convert`` print it and
exit 2."""

import json
import re
import struct

import numpy as np
import pytest
from safetensors import SafetensorError
from safetensors.numpy import load_file

from qlx.cli import main as qlx_main
from qlx.config import ModelConfig
from qlx.models.hf import config_to_hf
from qlx.models.safetensors_io import Reader, SafetensorsError, TensorToWrite, read_header, write_file

W = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
B = {"dtype": "I8", "shape": [4], "data_offsets": [24, 28]}
DATA = np.arange(6, dtype=np.float32).tobytes() + bytes([1, 2, 3, 4])


def _forge(path, header, data=DATA, header_len=None):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if header_len is None else header_len) + blob + data)
    return path


def test_valid_file_reads_like_the_safetensors_library(tmp_path):
    path = tmp_path / "ok.safetensors"
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2, 3, 4], np.int8)}
    empty = np.zeros((0, 5), np.float32)
    write_file(
        path,
        [TensorToWrite(n, a.dtype, a.shape, lambda a=a: a) for n, a in [*arrays.items(), ("empty", empty)]],
        metadata={"format": "np"},
    )
    infos, reference = read_header(path), load_file(path)
    assert set(infos) == set(reference) == {"w", "b", "empty"}
    reader = Reader()
    for name, array in reference.items():
        np.testing.assert_array_equal(reader.get(infos[name]), array)
    # a hand-forged file that is valid: two zero-size tensors at one offset, metadata of strings
    forged = _forge(tmp_path / "forged.safetensors", {"__metadata__": {"a": "b"}, "w": W, "b": B,
                    "z1": {"dtype": "BF16", "shape": [0], "data_offsets": [24, 24]},
                    "z2": {"dtype": "F16", "shape": [3, 0], "data_offsets": [24, 24]}})  # fmt: skip
    assert sorted(read_header(forged)) == sorted(load_file(forged)) == ["b", "w", "z1", "z2"]


FORGED = {
    "list_header": ([W, B], None, r"header must be a JSON object"),
    "no_shape": ({"w": {"dtype": "F32", "data_offsets": [0, 24]}, "b": B}, None, r"tensor w: entry lacks shape"),
    "entry_not_object": ({"w": [0, 24], "b": B}, None, r"tensor w: entry must be an object"),
    "unknown_dtype": ({"w": {**W, "dtype": "F8"}, "b": B}, None, r"tensor w: unsupported dtype 'F8'"),
    "negative_dim": ({"w": {**W, "shape": [-2, -3]}, "b": B}, None, r"tensor w: shape must be .*non-negative"),
    "float_dim": ({"w": {**W, "shape": [2.0, 3]}, "b": B}, None, r"tensor w: shape"),
    "negative_offsets": (
        {"w": {**W, "data_offsets": [-8, 16]}, "b": B}, None, r"tensor w: data_offsets \[-8, 16\] need 0 <= begin"),
    "reversed_offsets": ({"w": W, "b": {**B, "data_offsets": [28, 24]}}, None, r"tensor b: .*0 <= begin <= end"),
    "three_offsets": ({"w": {**W, "data_offsets": [0, 12, 24]}, "b": B}, None, r"tensor w: data_offsets must be two"),
    "size_mismatch": ({"w": {**W, "shape": [2, 2]}, "b": B}, None, r"tensor w: .*hold 24 bytes but F32 \[2, 2\]"),
    "overlap": (
        {"w": W, "b": {**B, "data_offsets": [20, 24]}, "c": {**B, "data_offsets": [24, 28]}}, None, r"overlaps tensor"),
    "gap": ({"w": W, "b": {**B, "data_offsets": [25, 29]}}, DATA + b"\0", r"tensor b: .*leaves a gap of 1 bytes"),
    "past_the_end": ({"w": W, "b": {**B, "shape": [8], "data_offsets": [24, 32]}}, None, r"tensor b ends at 32, but"),
    "trailing_bytes": ({"w": W, "b": B}, DATA + b"\0\0", r"tensor b ends at 28, but the data section holds 30"),
    "duplicate_key": (b'{"w": ' + json.dumps(W).encode() + b', "w": ' + json.dumps(W).encode() + b"}", None,
                      r"key 'w' appears twice"),
    "bad_metadata": ({"__metadata__": {"n": 1}, "w": W, "b": B}, None, r"__metadata__ must be an object of strings"),
    "not_json": (b"{not json", None, r"header is not valid JSON"),
    "not_utf8": (b'{"\xff": 1}', None, r"header is not valid JSON"),
}  # fmt: skip


@pytest.mark.parametrize("case", FORGED)
def test_forged_headers_are_refused_naming_file_and_tensor(tmp_path, case):
    header, data, message = FORGED[case]
    path = _forge(tmp_path / f"{case}.safetensors", header, DATA if data is None else data)
    with pytest.raises(SafetensorsError, match=message) as raised:
        read_header(path)
    assert str(path) in str(raised.value) and isinstance(raised.value, ValueError)
    if case != "bad_metadata":  # the reference reads metadata lazily; every other forgery it refuses as well
        with pytest.raises((SafetensorError, ValueError)):
            load_file(path)


def test_header_length_is_checked_against_the_file(tmp_path):
    for header_len in (10_000, 2**63):
        path = _forge(tmp_path / "long.safetensors", {"w": W, "b": B}, header_len=header_len)
        with pytest.raises(SafetensorsError, match=rf"header length {header_len} exceeds the file size"):
            read_header(path)
    (tmp_path / "short.safetensors").write_bytes(b"\1\2")
    with pytest.raises(SafetensorsError, match="shorter than 8 bytes"):
        read_header(tmp_path / "short.safetensors")


TINY = ModelConfig(family="qwen3", vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                   head_dim=8, intermediate_size=32, max_position_embeddings=128)  # fmt: skip


@pytest.mark.parametrize(
    ("config", "weights", "message"),
    [
        (config_to_hf(TINY), {"w": {**W, "data_offsets": [-8, 16]}, "b": B}, r"model\.safetensors: tensor w"),
        (config_to_hf(TINY), [W], r"model\.safetensors: header must be a JSON object"),
        ([1, 2], {"w": W, "b": B}, r"config\.json: must hold a JSON object"),
        ({**config_to_hf(TINY), "vocab_size": "big"}, {"w": W, "b": B}, r"config\.json: vocab_size: expected an int"),
        ({**config_to_hf(TINY), "rope_scaling": 4}, {"w": W, "b": B}, r"config\.json: rope_scaling: expected an obj"),
        (None, {"w": W, "b": B}, r"config\.json"),
    ],
    ids=["offsets", "list_header", "config_list", "config_type", "rope_type", "no_config"],
)
def test_serve_and_convert_print_load_errors_and_exit_2(tmp_path, capsys, config, weights, message):
    folder = tmp_path / "hf"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    _forge(folder / "model.safetensors", weights)
    for argv in (["serve", "--ckpt", str(folder), "--port", "0"], ["convert", "--hf", str(folder), "--out-hf",
                                                                     str(tmp_path / "out")]):  # fmt: skip
        assert qlx_main(argv) == 2
        err = capsys.readouterr().err
        assert f"qlx {argv[0]}: error:" in err and "Traceback" not in err
        assert re.search(message, err), err
