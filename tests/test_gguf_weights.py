"""GGUF weights read straight from the file equal what transformers reads, in every type we meet."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hogwild_ray.errors import ModelNotFoundError

gguf = pytest.importorskip("gguf")


def test_the_built_in_models_tensors_equal_transformers(default_hf_model):
    """The oracle: transformers' own GGUF load (Q4_1, Q8_0 and F32 tensors, llama's permuted q/k)."""
    from hogwild_ray.model.loader import default_checkpoint, load_config, weight_reader
    from hogwild_ray.model.shapes import tensor_shapes

    ckpt = default_checkpoint()
    config = load_config(ckpt)
    read = weight_reader(ckpt, config)
    theirs = default_hf_model.state_dict()
    names = list(tensor_shapes(config))
    assert len(names) == 272
    for name in names:
        mine = read(name)
        assert mine.dtype == torch.float32 and torch.equal(mine, theirs[name]), name
    assert read("model.layers.0.mlp.no_such.weight") is None


def write_qwen2(path, types: dict[str, int]):
    """One layer of a tiny qwen2 GGUF whose tensors are stored in the given GGML types."""
    h, heads, d, inter, vocab = 64, 2, 32, 64, 64
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(1)
    values = {}
    shapes = {"token_embd.weight": (vocab, h), "blk.0.attn_q.weight": (heads * d, h), "blk.0.attn_q.bias": (heads * d,),
              "blk.0.ffn_down.weight": (h, inter), "output_norm.weight": (h,)}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32)
        qtype = gguf.GGMLQuantizationType(types.get(name, gguf.GGMLQuantizationType.F32))
        stored = gguf.quants.quantize(x, qtype) if qtype != gguf.GGMLQuantizationType.F32 else x
        w.add_tensor(name, stored, raw_dtype=qtype if qtype != gguf.GGMLQuantizationType.F32 else None)
        values[name] = gguf.quants.dequantize(stored, qtype) if qtype != gguf.GGMLQuantizationType.F32 else x
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


def test_each_type_dequantizes_as_the_gguf_package_does_and_qwen_rows_stay_in_order(tmp_path):
    from hogwild_ray.model.gguf_weights import gguf_reader

    T = gguf.GGMLQuantizationType
    path = tmp_path / "m.gguf"
    values = write_qwen2(path, {"token_embd.weight": T.Q8_0, "blk.0.attn_q.weight": T.F16,
                                "blk.0.ffn_down.weight": T.BF16})
    read = gguf_reader(path, num_heads=2, num_kv_heads=2)
    for gguf_name, hf in [("token_embd.weight", "model.embed_tokens.weight"),
                          ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                          ("blk.0.attn_q.bias", "model.layers.0.self_attn.q_proj.bias"),
                          ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                          ("output_norm.weight", "model.norm.weight")]:
        got = read(hf)
        assert got.dtype == torch.float32 and got.shape == values[gguf_name].shape, hf
        assert np.array_equal(got.numpy(), values[gguf_name]), hf
        got.add_(1)  # a writable copy, never the mapped file


def test_a_file_cut_short_is_a_clear_error(tmp_path):
    from hogwild_ray.model.gguf_weights import gguf_reader

    path = tmp_path / "m.gguf"
    write_qwen2(path, {})
    path.write_bytes(path.read_bytes()[:-100])
    read = gguf_reader(path, num_heads=2, num_kv_heads=2)
    assert read("model.embed_tokens.weight") is not None  # the first tensors are whole
    with pytest.raises(ModelNotFoundError, match="cut short: download it again"):
        read("model.norm.weight")


def test_llama_rows_are_unpermuted_as_llama_cpp_permuted_them():
    from hogwild_ray.model.gguf_weights import unpermute_rotary_rows

    heads, d, cols = 3, 8, 5
    hf = np.arange(heads * d * cols, dtype=np.float32).reshape(heads * d, cols)
    # llama.cpp's convert_hf_to_gguf permute: each head's halves interleaved as pairs
    llama_cpp = hf.reshape(heads, 2, d // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    assert not np.array_equal(llama_cpp, hf)
    assert np.array_equal(unpermute_rotary_rows(llama_cpp, heads), hf)
