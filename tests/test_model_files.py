"""A model's files must make the model its config describes, or loading stops with a named error.

A config.json of another model, a missing or stray tensor, NaN/Inf weights, or an index that
points outside the model directory would otherwise run silently (or fail later with a raw shape
error). Each case here is refused by from_pretrained before the engine allocates its K/V pool,
and leaves no weights behind.
"""

from __future__ import annotations

import gc
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import hogwild_ray as hw
from hogwild_ray.errors import ModelNotFoundError, UnsupportedModelError

pytestmark = pytest.mark.reliability


# ---- helpers -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(random_model) -> Path:
    """The random 2-layer Llama (hidden 64, untied head) that other test files share."""
    return random_model("llama")[0]


def copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def edit_config(d: Path, **fields) -> None:
    raw = json.loads((d / "config.json").read_text())
    raw.update(fields)
    (d / "config.json").write_text(json.dumps(raw))


def edit_tensors(d: Path, edit) -> None:
    """Rewrite model.safetensors with edit(state) applied."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "model.safetensors"))
    edit(state)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})


def live(cls) -> int:
    return sum(type(o) is cls for o in gc.get_objects())


@pytest.fixture
def refused(monkeypatch):
    """refused(path, *names, read=False) -> the error's message: from_pretrained raises
    ModelNotFoundError naming each of names, as one line; no K/V pool is made, no layer's weights
    outlive the error, and (read=False) no weight is read at all."""
    from hogwild_ray.model.weights import LayerWeights
    from hogwild_ray.runner import model_runner

    calls: list[str] = []
    for name in ("KVPool", "load_weights"):
        real = getattr(model_runner, name)
        monkeypatch.setattr(model_runner, name, lambda *a, _n=name, _f=real, **k: calls.append(_n) or _f(*a, **k))

    def check(path, *names: str, read: bool = False, **kw) -> str:
        gc.collect()  # what earlier tests left for the collector is not counted as live
        before = live(LayerWeights)
        with pytest.raises(ModelNotFoundError) as err:
            hw.HogwildEngine.from_pretrained(path, cache_tokens=256, **kw)
        message = str(err.value)
        del err  # its traceback holds the loader's frames
        gc.collect()
        for name in names:
            assert name in message, message
        assert "\n" not in message
        assert calls == (["load_weights"] if read else []), calls
        assert live(LayerWeights) == before
        calls.clear()
        return message

    return check


# ---- a config.json of another model ------------------------------------------------------

def test_config_with_fewer_layers(base, tmp_path, refused):
    d = copy_model(base, tmp_path / "m")
    edit_config(d, num_hidden_layers=1)
    msg = refused(d, "num_hidden_layers=1", "2 layers", "config.json saved with these weights")
    assert msg.startswith("config.json says")


def test_config_with_more_layers(base, tmp_path, refused):
    d = copy_model(base, tmp_path / "m")
    edit_config(d, num_hidden_layers=3)
    refused(d, "num_hidden_layers=3", "2 layers")


def test_config_with_another_hidden_size(base, tmp_path, refused):
    d = copy_model(base, tmp_path / "m")
    edit_config(d, hidden_size=128)
    msg = refused(d, "'model.embed_tokens.weight'", "(49152, 64)", "(49152, 128)", "config.json saved with")
    assert re.search(r"and \d+ more tensors of other shapes", msg)


# ---- missing and unexpected tensors --------------------------------------------------------

def test_a_removed_tensor_is_named(base, tmp_path, refused):
    d = copy_model(base, tmp_path / "m")
    edit_tensors(d, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    refused(d, "1 missing", "'model.layers.1.mlp.up_proj.weight'")


def test_an_extra_tensor_is_named(base, tmp_path, refused):
    d = copy_model(base, tmp_path / "m")
    edit_tensors(d, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(3)}))
    refused(d, "1 unexpected", "'model.layers.0.mlp.extra.weight'")


def test_many_missing_are_counted_and_a_handful_named(base, tmp_path, refused):
    d = copy_model(base, tmp_path / "m")

    def drop(state):
        for n in [n for n in state if n.startswith("model.layers.1.") and "norm" not in n]:
            del state[n]
    edit_tensors(d, drop)
    msg = refused(d, "7 missing", "...")
    assert msg.count("'model.layers.1.") == 4


def test_sharded_checkpoint_with_a_tensor_missing(base, tmp_path, refused):
    """Two shards and an index, the index still naming a tensor its shard lacks."""
    from safetensors.torch import load_file, save_file

    d = copy_model(base, tmp_path / "m")
    state = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {n: f for f, ns in shards.items() for n in ns}
    lost = shards["model-00002-of-00002.safetensors"].pop()
    for f, ns in shards.items():
        save_file({n: state[n] for n in ns}, str(d / f), metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    refused(d, "1 missing", repr(lost))


# ---- NaN and Inf weights -------------------------------------------------------------------

def test_nan_weight_is_named(base, tmp_path, refused):
    d = copy_model(base, tmp_path / "m")
    edit_tensors(d, lambda s: s["model.norm.weight"].__setitem__(5, float("nan")))  # read last: layers placed first
    refused(d, "'model.norm.weight'", "NaN", "download or save the model again", read=True)


def test_inf_weight_is_named(base, tmp_path, refused):
    d = copy_model(base, tmp_path / "m")
    edit_tensors(d, lambda s: s["model.layers.1.mlp.down_proj.weight"].__setitem__((7, 9), float("-inf")))
    refused(d, "'model.layers.1.mlp.down_proj.weight'", "infinite", read=True)


def test_overflow_of_a_narrower_dtype_is_told_apart():
    from hogwild_ray.model.weights import check_finite

    big = torch.full((4, 4), 1e6)
    with pytest.raises(ModelNotFoundError, match="'w'.*beyond the range of torch.float16.*dtype=bfloat16"):
        check_finite("w", big.half(), big)
    check_finite("w", big, big)  # float32 holds it


# ---- an index must stay inside the model directory -----------------------------------------

def indexed(base: Path, d: Path, target: str) -> Path:
    """A copy of base whose index maps every tensor to `target`."""
    from safetensors import safe_open

    copy_model(base, d)
    with safe_open(str(base / "model.safetensors"), framework="pt") as h:
        names = list(h.keys())
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: target for n in names}}))
    return d


@pytest.fixture
def outside(base, tmp_path) -> Path:
    """The base model's weights, in a file beside (not inside) the model directory."""
    shutil.copy(base / "model.safetensors", tmp_path / "outside.safetensors")
    return tmp_path / "outside.safetensors"


def test_index_climbing_out_with_dotdot(base, tmp_path, outside, refused):
    d = indexed(base, tmp_path / "m", "../outside.safetensors")
    refused(d, "'../outside.safetensors'", "'..'", "inside the model directory")


def test_index_with_an_absolute_path(base, tmp_path, outside, refused):
    d = indexed(base, tmp_path / "m", str(outside))
    refused(d, repr(str(outside)), "absolute path")


def test_index_through_a_symlink_outside(base, tmp_path, outside, refused):
    d = indexed(base, tmp_path / "m", "weights.safetensors")
    (d / "weights.safetensors").symlink_to(outside)
    refused(d, "'weights.safetensors'", "outside the model directory", str(outside.resolve()))


def test_symlink_outside_without_index(base, tmp_path, outside, refused):
    """A link out of the directory is refused; links inside it load, and so do a Hugging Face hub
    cache snapshot's links into ../../blobs (every file of a snapshot is one)."""
    from hogwild_ray.model.loader import _safetensors_files

    d = copy_model(base, tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to(outside)
    refused(d, "'model.safetensors'", "outside the model directory")
    inner = copy_model(base, tmp_path / "inner")
    (inner / "model.safetensors").rename(inner / "real.bin")
    (inner / "model.safetensors").symlink_to("real.bin")
    assert _safetensors_files(inner) == [inner / "model.safetensors"]
    repo = tmp_path / "models--x--y"
    (repo / "blobs").mkdir(parents=True)
    snap = copy_model(base, repo / "snapshots" / "abc123")
    (snap / "model.safetensors").rename(repo / "blobs" / "f00d")
    (snap / "model.safetensors").symlink_to("../../blobs/f00d")
    assert _safetensors_files(snap) == [snap / "model.safetensors"]


def test_index_naming_a_missing_file(base, tmp_path, refused):
    d = indexed(base, tmp_path / "m", "model-00001-of-00002.safetensors")
    refused(d, "'model-00001-of-00002.safetensors'", "is missing")


def test_path_problem_judges_the_text_alone():
    from hogwild_ray.model.loader import path_problem

    assert path_problem("model-00001-of-00002.safetensors") is None
    assert path_problem("sub/model.safetensors") is None
    assert "absolute" in path_problem("/etc/passwd")
    assert "absolute" in path_problem("C:\\weights.safetensors")
    assert "'..'" in path_problem("sub/../../x.safetensors")
    assert "'..'" in path_problem("..\\x.safetensors")


# ---- GGUF: the file's own metadata against its tensors -------------------------------------

def write_gguf(path: Path, drop: str | None = None, extra: str | None = None, embedding_length: int = 64) -> Path:
    """A tiny Llama GGUF (2 layers, hidden 64, tied head) in float32."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    h, i, heads, kv, d, v = 64, 128, 4, 2, 16, 256
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(embedding_length)
    w.add_feed_forward_length(i)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_context_length(256)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(v)
    shapes = {"token_embd.weight": (v, h), "output_norm.weight": (h,), "rope_freqs.weight": (d // 2,)}
    for b in range(2):
        shapes |= {f"blk.{b}.attn_norm.weight": (h,), f"blk.{b}.ffn_norm.weight": (h,),
                   f"blk.{b}.attn_q.weight": (heads * d, h), f"blk.{b}.attn_k.weight": (kv * d, h),
                   f"blk.{b}.attn_v.weight": (kv * d, h), f"blk.{b}.attn_output.weight": (h, heads * d),
                   f"blk.{b}.ffn_gate.weight": (i, h), f"blk.{b}.ffn_up.weight": (i, h),
                   f"blk.{b}.ffn_down.weight": (h, i)}
    shapes.pop(drop, None)
    if extra:
        shapes[extra] = (h,)
    for name, shape in shapes.items():
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_header_tensors_match_their_metadata(tmp_path):
    from hogwild_ray.model.loader import file_tensors, load_config, locate

    ckpt = locate(write_gguf(tmp_path / "ok.gguf"))
    assert load_config(ckpt).num_hidden_layers == 2
    found = file_tensors(ckpt)
    assert found["model.layers.1.self_attn.o_proj.weight"] == (64, 64)
    assert found["model.embed_tokens.weight"] == (256, 64) and "rope_freqs.weight" not in found


def test_gguf_missing_tensor(tmp_path, refused):
    from hogwild_ray.model.loader import quick_spec

    path = write_gguf(tmp_path / "m.gguf", drop="blk.1.ffn_up.weight")
    refused(path, "1 missing", "'model.layers.1.mlp.up_proj.weight'", "GGUF")
    with pytest.raises(ModelNotFoundError, match="1 missing"):  # the command line's check, before any load
        quick_spec(path)


def test_gguf_unexpected_tensor(tmp_path, refused):
    path = write_gguf(tmp_path / "m.gguf", extra="blk.0.attn_sinks.weight")
    refused(path, "1 unexpected", "'blk.0.attn_sinks.weight'", "convert or download it again")


def test_gguf_metadata_of_another_shape(tmp_path, refused):
    path = write_gguf(tmp_path / "m.gguf", embedding_length=96)
    refused(path, "'model.embed_tokens.weight'", "(256, 64)", "(256, 96)", "the GGUF metadata implies")


# ---- the pure check: what valid checkpoints may differ in ----------------------------------

@pytest.mark.parametrize("family,options", [
    ("llama", {}), ("llama", {"attention_bias": True}), ("llama", {"tie_word_embeddings": True}),
    ("mistral", {}), ("qwen2", {}), ("qwen3", {}), ("qwen3", {"attention_bias": True}),
])
def test_tensor_shapes_are_those_transformers_saves(family, options):
    from models import make_config
    from transformers import AutoModelForCausalLM

    from hogwild_ray.model.loader import check_tensors
    from hogwild_ray.model.shapes import tensor_shapes

    cfg = make_config(family, **options)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    saved = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        saved.pop("lm_head.weight", None)
    assert tensor_shapes(cfg) == saved
    check_tensors(saved, cfg)


def test_the_check_accepts_harmless_differences():
    from models import make_config

    from hogwild_ray.model.loader import check_tensors
    from hogwild_ray.model.shapes import tensor_shapes

    tied = make_config("qwen3")
    found = tensor_shapes(tied)
    found = {n.removeprefix("model."): s for n, s in found.items()}  # a base model's names
    found["lm_head.weight"] = found["embed_tokens.weight"]  # a tied head saved anyway
    found["layers.0.self_attn.rotary_emb.inv_freq"] = (8,)  # an old save's buffer
    check_tensors(found, tied)
    found["lm_head.weight"] = (7, 64)
    with pytest.raises(ModelNotFoundError, match="'lm_head.weight' has shape"):
        check_tensors(found, tied)


def test_mlp_biases_are_refused_by_name():
    from models import make_config

    from hogwild_ray.model.spec import spec_from_config

    with pytest.raises(UnsupportedModelError, match="mlp_bias"):
        spec_from_config(make_config("llama", mlp_bias=True))


# ---- the command line shows them as one error line -----------------------------------------

def test_cli_shows_a_model_file_error_as_one_line(base, tmp_path, capsys):
    from hogwild_ray.cli import main

    d = copy_model(base, tmp_path / "m")
    edit_config(d, num_hidden_layers=1)
    assert main(["run", "--model", str(d), "--max-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: config.json says num_hidden_layers=1"), err
