"""transformers' PyTorch `BertForPreTraining`, built to match a flaxbert model and train step:
the reference a user would pick instead of flaxbert (`train_throughput.py --compare-torch`).

    ref = TorchBert(model_config, config.train, threads=2)
    loss = ref.step(ref.batch(host_batch))   # one AdamW step on a flaxbert batch

What it mirrors (`flaxbert.pretraining_model.BertForPreTraining` and
`flaxbert.pretrain_step.make_train_step`): the same sizes, exact (erf) GELU, post-LayerNorm blocks,
dropout at the same places and rates (embeddings, attention probabilities, after attention
and feed-forward; on in `step`), the MLM decoder tied to the word embeddings, and the loss:
mean MLM cross-entropy over the real predictions + mean NSP cross-entropy. Attention is
`attn_implementation="sdpa"` (`torch.nn.functional.scaled_dot_product_attention`). The
optimizer is `torch.optim.AdamW` (torch's default implementation for the device) with
`train.adam_b1/adam_b2/adam_eps`, `train.weight_decay` on every parameter but LayerNorm
weights and biases (flaxbert's `decay_mask`), and global-norm clipping at
`train.max_grad_norm` (none when 0) as `make_optimizer` reads them; the learning rate is
`train.learning_rate`, constant: flaxbert's warm-up and decay change no step's work, so for
timing a constant one is the same. flaxbert's `optax.apply_if_finite` (one all-finite check
of the gradients) has no counterpart here, and the batch is one (no `train.grad_accum_steps`
micro-batches). tests/torch_reference_test.py checks that from the same parameters and
batches, dropout off, the losses of three steps equal flaxbert's
(`TorchBert.load_flax_params` copies flaxbert's parameters in).

What differs, as users run it: transformers computes vocabulary logits at every position,
(B, L, V), and its loss picks the masked ones through labels -100 elsewhere; flaxbert
gathers the P masked positions first and computes (B, P, V) only. That is part of what a
comparison measures. `model.dtype` bfloat16 is `torch.autocast` here (`autocast_dtype`);
parameters and optimizer state stay float32, as in flaxbert.

Shape suffixes as in `flaxbert.model`: B batch, L sequence length, P masked-LM predictions
per sequence, V vocabulary.

torch and transformers are optional (`pip install 'flaxbert[bench]'`); this module imports
them only when a TorchBert is built or `torch_version_line` is called.
"""

from __future__ import annotations

import contextlib

import numpy as np

from flaxbert.config import require
from flaxbert.model_config import BertConfig

INSTALL_ADVICE = (
    "the PyTorch reference needs torch and transformers: pip install 'flaxbert[bench]' "
    "(on a CPU-only machine first pip install torch --index-url "
    "https://download.pytorch.org/whl/cpu, which avoids the multi-GB CUDA build)"
)


def _import_torch():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise SystemExit(f"{INSTALL_ADVICE} ({e})") from None
    return torch, transformers


def torch_version_line() -> str:
    """'torch X, transformers Y'; SystemExit with install advice when either is missing."""
    torch, transformers = _import_torch()
    return f"torch {torch.__version__}, transformers {transformers.__version__}"


def mlm_labels(batch: dict[str, np.ndarray]) -> np.ndarray:
    """transformers' MLM labels (B, L) of a flaxbert batch: the id to predict at each masked
    position (`masked_lm_positions` (B, P) whose `masked_lm_weights` are > 0), -100 elsewhere."""
    b, s = batch["input_ids"].shape
    labels_BL = np.full((b, s), -100, np.int32)
    rows, cols = np.nonzero(batch["masked_lm_weights"] > 0)
    labels_BL[rows, batch["masked_lm_positions"][rows, cols]] = batch["masked_lm_ids"][rows, cols]
    return labels_BL


def _no_decay(name: str) -> bool:
    """flaxbert's `decay_mask` in transformers' names: LayerNorm weights and biases."""
    return name.endswith("bias") or "LayerNorm" in name


def hf_config_kwargs(m: BertConfig) -> dict:
    """transformers' `BertConfig` arguments for flaxbert's `model_config` `m` (the same
    sizes, exact (erf) GELU, dropout rates, initialiser range and LayerNorm epsilon)."""
    return dict(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        intermediate_size=m.intermediate_size,
        hidden_act="gelu",  # exact (erf) GELU, as flaxbert
        hidden_dropout_prob=m.hidden_dropout_rate,
        attention_probs_dropout_prob=m.attention_dropout_rate,
        max_position_embeddings=m.max_position_embeddings,
        type_vocab_size=m.type_vocab_size,
        initializer_range=m.initializer_range,
        layer_norm_eps=m.layer_norm_eps,
    )


class TorchBert:
    """transformers' `BertForPreTraining` and its AdamW optimizer, sized as `model_config`
    and configured as `train_config` (a flaxbert `config.train`); see the module docstring."""

    def __init__(
        self,
        model_config: BertConfig,
        train_config,
        *,
        device: str = "cpu",
        autocast_dtype: str | None = None,
        threads: int | None = None,
        seed: int = 0,
    ):
        torch, transformers = _import_torch()
        self._torch = torch
        if threads is not None:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        self.device = torch.device(device)
        self.model_config = model_config
        m, t = model_config, train_config
        require(
            t.optimizer == "adamw",
            "train.optimizer",
            t.optimizer,
            "the PyTorch reference trains with AdamW (torch has no LAMB); set it to adamw",
        )
        hf_config = transformers.BertConfig(**hf_config_kwargs(m), attn_implementation="sdpa")
        torch.manual_seed(seed)
        self.model = transformers.BertForPreTraining(hf_config).to(self.device)
        self.model.train()
        named = list(self.model.named_parameters())  # tied parameters appear once
        groups = [
            {"params": [p for n, p in named if not _no_decay(n)], "weight_decay": t.weight_decay},
            {"params": [p for n, p in named if _no_decay(n)], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            groups, lr=t.learning_rate, betas=(t.adam_b1, t.adam_b2), eps=t.adam_eps
        )
        self.max_grad_norm = t.max_grad_norm
        self.autocast_dtype = autocast_dtype
        if autocast_dtype is not None and autocast_dtype != "float32":
            dtype = getattr(torch, autocast_dtype)
            self._autocast = lambda: torch.autocast(self.device.type, dtype=dtype)
        else:
            self._autocast = contextlib.nullcontext

    def batch(self, host_batch: dict[str, np.ndarray]) -> dict:
        """A flaxbert pre-training batch (host arrays) as the model's keyword arguments: int64
        tensors on the device, MLM labels (B, L) -100 where nothing is predicted."""
        torch = self._torch
        arrays = {
            "input_ids": host_batch["input_ids"],
            "attention_mask": host_batch["input_mask"],
            "token_type_ids": host_batch["segment_ids"],
            "labels": mlm_labels(host_batch),
            "next_sentence_label": host_batch["next_sentence_labels"],
        }
        return {
            k: torch.as_tensor(np.asarray(a, np.int64), device=self.device)
            for k, a in arrays.items()
        }

    def step(self, batch) -> float:
        """One training step on `batch` (from `self.batch`): zero_grad, forward in train mode
        (dropout on), MLM + NSP loss, backward, clipping, AdamW; waited for. Returns the loss
        before the update."""
        torch = self._torch
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.model(**batch).loss
        loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return float(loss.detach())

    def load_flax_params(self, params) -> None:
        """Copies a flaxbert pre-training parameter tree (`state.params`, layers stacked or
        not) into the model, through `flaxbert.convert.params_to_hf`'s name and layout
        mapping (the export's); vocabulary rows stay in flaxbert's order."""
        from flaxbert import convert

        torch = self._torch
        identity = np.arange(self.model_config.vocab_size)
        weights, _, heads = convert.params_to_hf(params, self.model_config, identity)
        if heads != ["pooler", "mlm", "nsp"]:
            raise ValueError(f"need the pooler, MLM and NSP heads; the parameters hold {heads}")
        state = {k: torch.from_numpy(np.array(w, np.float32)) for k, w in weights.items()}
        # The decoder is tied to these two; given explicitly, it holds them however tied.
        decoder_weight, decoder_bias = convert.TIED_DECODER
        state[decoder_weight] = state["bert.embeddings.word_embeddings.weight"]
        state[decoder_bias] = state["cls.predictions.bias"]
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = set(missing) - {f"bert.{b}" for b in convert.BUFFERS}
        if missing or unexpected:
            raise ValueError(
                f"flaxbert -> transformers: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
