"""The embedded model: a small Llama the lesson builds itself, offline, deterministically.

It has the architecture and config style of ``HuggingFaceTB/SmolLM2-135M``
(``LlamaForCausalLM``, grouped-query attention, tied embeddings, RoPE), scaled
down so that it trains in a few minutes on two CPU cores. Hidden and
intermediate sizes are multiples of 256, so every method's block and group size
applies (bitsandbytes NF4 blocks of 64, groups of 128, GGUF K-quant
super-blocks of 256).

The build is a pure function of its :class:`Recipe`, the Python version (whose
standard library is the corpus) and the torch version: the same inputs on the
same machine give the same weights. It is cached in a folder named by the hash
of those inputs, written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from quantlesson import data
from quantlesson.errors import LessonError

RECIPE_FORMAT = 2  # bump when the build code changes in a way the recipe fields do not show
EOS = "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that determines the embedded model's tokenizer and weights."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    rope_theta: float = 100_000.0
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    seed: int = 0

    def key(self) -> str:
        """A short hash of the recipe and of what else changes the result (Python, torch, build code)."""
        facts = dataclasses.asdict(self) | {
            "format": RECIPE_FORMAT,
            "python": platform.python_version(),
            "torch": torch.__version__,
        }
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]


def cache_root() -> Path:
    """Where built models live: ``$QUANTLESSON_CACHE``, else ``~/.cache/quantlesson``."""
    configured = os.environ.get("QUANTLESSON_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quantlesson"


def folder(recipe: Recipe = Recipe()) -> Path:
    """The folder the embedded model of this recipe is (or will be) stored in."""
    return cache_root() / f"embedded-{recipe.key()}"


def ensure_built(recipe: Recipe = Recipe(), progress: bool = True) -> Path:
    """Return the model folder, building it first if it is not there yet."""
    target = folder(recipe)
    if (target / "config.json").exists():
        return target
    return build(recipe, target, progress=progress)


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (as in GPT-2 and SmolLM2), trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, model_max_length=2048)


def llama_config(recipe: Recipe, eos_id: int):
    """The model config: SmolLM2's style, scaled down."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        head_dim=recipe.hidden_size // recipe.num_attention_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        rope_theta=recipe.rope_theta,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        initializer_range=0.02,
    )


def _training_ids(tokenizer, documents: list[str]) -> torch.Tensor:
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    encoded = tokenizer(documents, add_special_tokens=False).input_ids
    flat = [token for ids in encoded for token in ids + [eos_id]]
    return torch.tensor(flat, dtype=torch.long)


def _learning_rate(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, ids: torch.Tensor, recipe: Recipe, progress: bool = True) -> list[float]:
    """Train ``model`` on random windows of ``ids``; return the loss of every step."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(recipe.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.learning_rate,
        betas=(0.9, 0.95),
    )
    model.train()
    losses = []
    bar = tqdm(range(recipe.steps), desc="training the embedded model", disable=not progress)
    for step in bar:
        starts = torch.randint(0, ids.numel() - recipe.seq_len, (recipe.batch_size,), generator=generator)
        batch = torch.stack([ids[s : s + recipe.seq_len] for s in starts.tolist()])  # [B, T]
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, recipe)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def _digest(model) -> str:
    """SHA-256 of every parameter's bytes, in order: the fingerprint of a set of weights."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build(recipe: Recipe = Recipe(), target: Path | None = None, progress: bool = True) -> Path:
    """Build the tokenizer and model of ``recipe`` into ``target`` (atomically) and return it."""
    from transformers import LlamaForCausalLM

    target = Path(target) if target is not None else folder(recipe)
    if recipe.hidden_size % 256 or recipe.intermediate_size % 256:
        raise LessonError("hidden_size and intermediate_size must be multiples of 256 for every method to apply.")
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    documents = list(data.embedded_documents("train", "all").values())
    tokenizer = train_tokenizer(documents, recipe.vocab_size)
    ids = _training_ids(tokenizer, documents)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(llama_config(recipe, eos_id))
    initial = _digest(model)
    losses = train(model, ids, recipe, progress)
    model.generation_config.pad_token_id = eos_id
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.to(torch.bfloat16).save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        facts = {
            "recipe": dataclasses.asdict(recipe),
            "key": recipe.key(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "training_tokens": ids.numel(),
            "training_ids_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
            "initial_weights_sha256": initial,
            "final_weights_sha256": _digest(model),
            "loss_every_50_steps": [round(loss, 4) for loss in losses[::50]],
            "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "build_seconds": round(time.perf_counter() - started, 1),
            "corpus_licence": "Python Software Foundation License (the standard library's LICENSE.txt)",
        }
        (scratch / "recipe.json").write_text(json.dumps(facts, indent=2))
        if target.exists():  # a concurrent build finished first: keep theirs
            shutil.rmtree(scratch)
        else:
            os.replace(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return target


def main() -> None:
    """``python -m quantlesson.embedded``: build (or find) the embedded model and print its folder."""
    path = ensure_built()
    facts = json.loads((path / "recipe.json").read_text())
    print(f"Embedded model ready at {path} (built in {facts['build_seconds']} s, final training loss {facts['final_loss']:.3f})")


if __name__ == "__main__":
    main()
