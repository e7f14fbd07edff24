"""The registered policy as an MLflow pyfunc, logged "from code" (this file is copied with it).

Why pyfunc-from-code rather than the transformers flavour: the policy is a plain safetensors
directory (weights + tokenizer) that `save_pretrained` wrote; shipping that directory as an
artifact and this small loader keeps the model loadable offline with only mlflow, torch and
transformers (no pickled classes, no hub lookups, no dependency on the upbeat package).
`upbeat generate` reads the same directory through `upbeat.registry.download_policy`.

Input: a DataFrame with a `prompt` column (or a list of prompts). Params: `max_new_tokens`,
`temperature`, `seed`. Output: one continuation per prompt.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

ARTIFACT = "policy"


class PolicyModel(PythonModel):
    """Samples continuations from the registered causal LM."""

    def load_context(self, context: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts[ARTIFACT]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"  # so every row's next token is in the last column
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()

    def predict(
        self, context, model_input, params=None
    ):  # untyped: the signature is given at log time
        import torch

        params = params or {}
        if hasattr(model_input, "columns"):
            prompts = [str(p) for p in model_input["prompt"]]
        else:
            prompts = [str(p) for p in model_input]
        torch.manual_seed(int(params.get("seed", 0)))
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True)
        pad = self.tokenizer.pad_token_id
        with torch.no_grad():
            out = self.model.generate(
                **enc,
                do_sample=True,
                max_new_tokens=int(params.get("max_new_tokens", 16)),
                temperature=float(params.get("temperature", 1.0)),
                top_k=0,
                pad_token_id=pad if pad is not None else self.tokenizer.eos_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]  # (B, R) continuation tokens only
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)


mlflow.models.set_model(PolicyModel())
