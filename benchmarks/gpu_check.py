"""GPU check: the CUDA paths that a CPU-only machine (and so the test suite) cannot run.

    python benchmarks/gpu_check.py [--model packaged:smollm2-135m]

With a CUDA device visible it runs, on `cuda:0`:
1. the tiny-model PPO learning test (tests/model/test_ppo_learns.py's recipe) with `ppo.bf16: auto`
   (bf16 autocast on Ampere or newer), and a few tiny SFT steps and evaluate continuations;
2. one default-profile PPO step (params.yaml's `ppo` block on `--model`, VADER reward) after a
   warm-up step, printing the step time and its phases (generate, score, reference, train);
3. the checkpoint round trip GPU -> CPU -> GPU: a run checkpointed on the GPU resumes on the CPU,
   whose checkpoint resumes on the GPU again (in fp32: `ppo.bf16: auto` resolves per device and a
   checkpoint resumes only the precision it was written in).
Each check prints one line; the script exits 1 if one fails. Without CUDA it says so and exits 0:
nothing here is run on the CPU in the GPU's place. Figures go to benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import tiny  # noqa: E402  (tests/tiny.py builds the tiny models)

from upbeat.checkpoints import latest_checkpoint, load_checkpoint  # noqa: E402
from upbeat.config import load_params  # noqa: E402
from upbeat.generation import sample_continuations  # noqa: E402
from upbeat.models import load_policy, resolve_bf16  # noqa: E402
from upbeat.ppo import train  # noqa: E402
from upbeat.rewards import build_spec, load_scorer  # noqa: E402
from upbeat.sft import train as sft_train  # noqa: E402

TARGETS = set(range(50, 60))  # the toy reward's tokens, as in tests/model/test_ppo_learns.py
PHASES = ("generate", "score", "reference", "train")


class Stopped(Exception):
    """A run stopped on purpose after a checkpoint (the round trip moves it to another device)."""


def toy_reward(tok):
    def count_targets(texts):
        ids = tok(list(texts), add_special_tokens=False)["input_ids"]
        return np.array([sum(i in TARGETS for i in row) for row in ids], dtype=float)

    return count_targets


def phases(history: list[dict[str, float]]) -> str:
    per = {k: statistics.median(h[f"time/{k}"] for h in history) for k in PHASES}
    total = sum(per.values())
    return f"{total:.2f} s/step (" + ", ".join(f"{k} {v:.2f}" for k, v in per.items()) + ")"


def tiny_learns(model_dir: Path, device: torch.device) -> str:
    """tests/model/test_ppo_learns.py on the GPU, then tiny SFT and evaluate on it."""
    base = load_params(ROOT / "params.yaml")
    model, tok = load_policy(str(model_dir), device=device)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    cfg = base.ppo.model_copy(
        update=dict(
            steps=20, batch_size=32, minibatch_size=8, ppo_epochs=4, learning_rate=3e-3,
            max_new_tokens=12, train_top_blocks=2, init_kl_coef=0.05, seed=0, bf16="auto",
        )
    )  # fmt: skip
    history = train(model, tok, toy_reward(tok), tiny.CORPUS, cfg).history
    scores = [h["objective/score"] for h in history]
    first, last = np.mean(scores[:3]), np.mean(scores[-3:])
    assert last > first + 2.0 and last > 3 * first, f"did not learn: {scores}"
    assert all(p.device == device for p in model.parameters())
    bf16 = bool(history[-1]["perf/bf16"])

    model, tok = load_policy(str(model_dir), device=device)
    sft = base.sft.model_copy(update=dict(epochs=2, batch_size=8, train_top_blocks=0, seed=1))
    ppl = sft_train(model, tok, tiny.CORPUS[:40], tiny.CORPUS[40:], sft).metrics
    assert ppl["sft/eval_ppl_after"] < ppl["sft/eval_ppl_before"], ppl
    texts = sample_continuations(
        model, tok, ["i love", "so sad"], max_new_tokens=6, temperature=1.0, seed=0, batch_size=2
    )
    assert len(texts) == 2
    return (
        f"score {first:.2f} -> {last:.2f} in 20 steps (bf16 {bf16}), {phases(history[1:])}; "
        f"SFT eval ppl {ppl['sft/eval_ppl_before']:.1f} -> {ppl['sft/eval_ppl_after']:.1f}"
    )


def default_step(model_spec: str, device: torch.device) -> str:
    """Two PPO steps with params.yaml's `ppo` block on the default model: the second is timed."""
    params = load_params(ROOT / "params.yaml")
    model, tok = load_policy(model_spec, device=device)
    scorer = load_scorer(build_spec(params.reward))
    texts = [t for t in tiny.CORPUS for _ in range(20)]
    cfg = params.ppo.model_copy(update=dict(steps=2))
    start = time.perf_counter()
    history = train(model, tok, scorer, texts, cfg).history
    seconds = time.perf_counter() - start
    step = history[-1]
    return (
        f"{model_spec}, batch {cfg.batch_size}, bf16 {resolve_bf16(cfg.bf16, device)}: "
        f"{phases(history[1:])}, {step['perf/episodes_per_s']:.1f} episodes/s "
        f"({seconds:.1f} s for both steps, the first a warm-up)"
    )


def round_trip(model_dir: Path, device: torch.device, ckpt: Path) -> str:
    """A GPU run's checkpoint resumes on the CPU; the CPU's checkpoint resumes on the GPU."""
    cfg = load_params(ROOT / "params.yaml").ppo.model_copy(
        update=dict(
            steps=4, batch_size=8, minibatch_size=4, ppo_epochs=1, max_new_tokens=6,
            train_top_blocks=1, checkpoint_every=1, bf16=False, seed=3,
        )
    )  # fmt: skip

    def run(where: torch.device, stop_after: int):
        """Run on `where` until the checkpoint of step `stop_after` is written."""
        model, tok = load_policy(str(model_dir), device=where)
        at_checkpoint: dict[str, torch.Tensor] = {}

        def stop(step: int, metrics: dict[str, float]) -> None:
            # Called after step `step`'s update and before its checkpoint is written.
            if step == stop_after:
                at_checkpoint.update((n, p.detach().clone()) for n, p in model.named_parameters())
            if step > stop_after:
                raise Stopped

        try:
            result = train(model, tok, toy_reward(tok), tiny.CORPUS, cfg, checkpoint_dir=ckpt,
                           on_step=stop)  # fmt: skip
        except Stopped:
            result = None
        return result, model, at_checkpoint

    _, _, on_gpu = run(device, 2)
    saved = load_checkpoint(latest_checkpoint(ckpt))
    assert saved.step == 2, saved.step
    assert all(t.device.type == "cpu" for t in saved.weights.values())
    for name, value in saved.weights.items():
        if name.startswith("model."):  # the trained blocks (the value head is not the model's)
            assert torch.equal(value, on_gpu[name.removeprefix("model.")].cpu()), name
    run(torch.device("cpu"), 3)
    assert load_checkpoint(latest_checkpoint(ckpt)).step == 3  # the CPU resumed and went on
    back, model, _ = run(device, 4)
    assert back is not None and back.resumed_from == 3 and len(back.history) == 4
    assert all(np.isfinite(h["objective/score"]) for h in back.history)
    assert all(p.device == device for p in model.parameters())
    return "GPU steps 1-2 -> CPU step 3 -> GPU step 4: resumed at 2 and 3, weights bit-exact"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="packaged:smollm2-135m", help="default-profile policy")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device visible (torch {torch.__version__}, CUDA build: "
            f"{torch.version.cuda or 'none'}); nothing to check on this machine"
        )
        return 0
    device = torch.device("cuda", 0)
    print(
        f"gpu_check: {torch.cuda.get_device_name(device)}, {torch.cuda.device_count()} visible, "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"bf16 {torch.cuda.is_bf16_supported(including_emulation=False)}"
    )
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny.build_tiny_llama(Path(tmp) / "tiny-llama")
        checks = {
            "tiny PPO learns, tiny SFT + sampling": lambda: tiny_learns(model_dir, device),
            "default-profile PPO step": lambda: default_step(args.model, device),
            "checkpoint round trip": lambda: round_trip(model_dir, device, Path(tmp) / "ckpt"),
        }
        for name, check in checks.items():
            try:
                print(f"ok   {name}: {check()}", flush=True)
            except Exception as exc:  # report every check, then fail
                failed += 1
                print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
