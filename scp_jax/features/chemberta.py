"""ChemBERTa SMILES embeddings: the RoBERTa encoder in Flax NNX, loaded from a transformers checkpoint.

Only the encoder's `last_hidden_state` is used (pooled by the first token or a masked mean);
LM and regression heads are never loaded, since MLM logits are token predictions, not embeddings.
Everything resolves offline: a local directory, or a model already in the Hugging Face cache.
"""

import dataclasses
import functools
import re
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from scp_jax.errors import UserError

DEFAULT_MODEL = "DeepChem/ChemBERTa-77M-MTR"
POOLINGS = ("cls", "mean")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HIGHEST = jax.lax.Precision.HIGHEST  # full f32 matmuls: embeddings are computed once, exactness beats speed
_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    pad_token_id: int
    layer_norm_eps: float
    activation: str

    @property
    def max_tokens(self):
        """Longest input: RoBERTa positions start at pad_token_id + 1."""
        return self.max_positions - self.pad_token_id - 1


def encoder_config(hf_config):
    """The encoder's sizes from a transformers RobertaConfig, rejecting variants this port lacks."""
    position_type = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
    if position_type != "absolute":
        raise UserError(f"ChemBERTa config has position_embedding_type={position_type!r}; only 'absolute' is supported")
    if hf_config.hidden_act not in _ACTIVATIONS:
        raise UserError(f"ChemBERTa config has hidden_act={hf_config.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}")
    if hf_config.hidden_size % hf_config.num_attention_heads:
        heads = hf_config.num_attention_heads
        raise UserError(f"hidden_size {hf_config.hidden_size} is not a multiple of {heads} attention heads")
    return EncoderConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        max_positions=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size,
        pad_token_id=hf_config.pad_token_id,
        layer_norm_eps=hf_config.layer_norm_eps,
        activation=hf_config.hidden_act,
    )


def position_ids(input_ids, pad_token_id):
    """RoBERTa positions: pad_token_id + running count of real tokens; padding keeps pad_token_id."""
    real = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + pad_token_id


class EncoderLayer(nnx.Module):
    """Post-LayerNorm transformer block: self-attention, then GELU MLP, each with a residual."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.num_heads = config.num_heads
        self.activation = _ACTIVATIONS[config.activation]
        linear = functools.partial(nnx.Linear, precision=HIGHEST, rngs=rngs)
        self.query = linear(hidden, hidden)
        self.key = linear(hidden, hidden)
        self.value = linear(hidden, hidden)
        self.attention_output = linear(hidden, hidden)
        self.attention_norm = nnx.LayerNorm(hidden, epsilon=eps, rngs=rngs)
        self.intermediate = linear(hidden, config.intermediate_size)
        self.output = linear(config.intermediate_size, hidden)
        self.output_norm = nnx.LayerNorm(hidden, epsilon=eps, rngs=rngs)

    def __call__(self, hidden, attention_bias):
        batch, length, width = hidden.shape
        split_heads = lambda x: x.reshape(batch, length, self.num_heads, width // self.num_heads)
        query, key, value = (split_heads(layer(hidden)) for layer in (self.query, self.key, self.value))
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, precision=HIGHEST) / np.sqrt(query.shape[-1]) + attention_bias
        attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), value, precision=HIGHEST).reshape(hidden.shape)
        hidden = self.attention_norm(hidden + self.attention_output(attended))
        return self.output_norm(hidden + self.output(self.activation(self.intermediate(hidden))))


class RobertaEncoder(nnx.Module):
    """RoBERTa without pooler or heads: (input_ids, attention_mask) -> last_hidden_state, eval mode."""

    def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.pad_token_id = config.pad_token_id
        self.word_embeddings = nnx.Embed(config.vocab_size, hidden, rngs=rngs)
        self.position_embeddings = nnx.Embed(config.max_positions, hidden, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(config.type_vocab_size, hidden, rngs=rngs)
        self.embeddings_norm = nnx.LayerNorm(hidden, epsilon=config.layer_norm_eps, rngs=rngs)
        self.layers = nnx.List([EncoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])

    def __call__(self, input_ids, attention_mask):
        embedded = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids(input_ids, self.pad_token_id))
            + self.token_type_embeddings(jnp.zeros_like(input_ids))
        )
        hidden = self.embeddings_norm(embedded)
        attention_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(hidden.dtype).min)
        for layer in self.layers:
            hidden = layer(hidden, attention_bias)
        return hidden


def _checkpoint_layout(num_layers):
    """(checkpoint module name, encoder attribute path, kind) for every encoder parameter."""
    layout = [
        ("embeddings.word_embeddings", ("word_embeddings",), "embed"),
        ("embeddings.position_embeddings", ("position_embeddings",), "embed"),
        ("embeddings.token_type_embeddings", ("token_type_embeddings",), "embed"),
        ("embeddings.LayerNorm", ("embeddings_norm",), "norm"),
    ]
    per_layer = [
        ("attention.self.query", "query", "linear"),
        ("attention.self.key", "key", "linear"),
        ("attention.self.value", "value", "linear"),
        ("attention.output.dense", "attention_output", "linear"),
        ("attention.output.LayerNorm", "attention_norm", "norm"),
        ("intermediate.dense", "intermediate", "linear"),
        ("output.dense", "output", "linear"),
        ("output.LayerNorm", "output_norm", "norm"),
    ]
    for i in range(num_layers):
        layout += [(f"encoder.layer.{i}.{name}", ("layers", i, attr), kind) for name, attr, kind in per_layer]
    return layout


# Checkpoint parameter suffix(es) -> NNX parameter name; old checkpoints name LayerNorm params gamma/beta.
_PARAMETERS = {
    "embed": {"embedding": ("weight",)},
    "linear": {"kernel": ("weight",), "bias": ("bias",)},
    "norm": {"scale": ("weight", "gamma"), "bias": ("bias", "beta")},
}


def load_encoder(tensors, config: EncoderConfig):
    """An encoder holding the checkpoint's weights (keyed like transformers' RobertaModel), shapes checked."""
    encoder = nnx.eval_shape(lambda: RobertaEncoder(config, rngs=nnx.Rngs(0)))
    state = {}
    for module_name, path, kind in _checkpoint_layout(config.num_layers):
        module, node = encoder, state
        for attr in path:
            module = module[attr] if isinstance(attr, int) else getattr(module, attr)
            node = node.setdefault(attr, {})
        for name, suffixes in _PARAMETERS[kind].items():
            key = next((f"{module_name}.{s}" for s in suffixes if f"{module_name}.{s}" in tensors), None)
            if key is None:
                raise UserError(f"ChemBERTa checkpoint lacks '{module_name}.{suffixes[0]}'; is it a RoBERTa model?")
            value = tensors[key].T if name == "kernel" else tensors[key]
            expected = getattr(module, name).shape
            if value.shape != expected:
                raise UserError(f"ChemBERTa weight '{key}' has shape {value.shape}, config.json implies {expected}")
            node[name] = jnp.asarray(value, dtype=jnp.float32)
    nnx.update(encoder, state)
    return encoder


def read_checkpoint(model_dir):
    """Encoder tensors as float32 numpy, keyed without the `roberta.` prefix; LM/task heads dropped."""
    path = weights_file(model_dir)
    if path is None:
        raise UserError(offline_hint(model_dir))
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        raw = load_file(path)
    else:
        import torch  # only for checkpoints published as pickled torch tensors

        raw = {k: v.float().numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
    encoder_keys = ("embeddings.", "encoder.")
    tensors = {k.removeprefix("roberta."): np.asarray(v, dtype=np.float32) for k, v in raw.items()}
    return {k: v for k, v in tensors.items() if k.startswith(encoder_keys)}


def offline_hint(model):
    """Where the weights must be put, in one line (nothing is ever downloaded here)."""
    if Path(model).is_dir():
        return (f"no ChemBERTa weights in {model}: the folder needs config.json, tokenizer files and "
                f"{' or '.join(WEIGHT_FILES)}")
    if not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", str(model)):  # a path, not a hub name like owner/model
        return f"no ChemBERTa model folder {model}: pass --model DIR holding config.json, tokenizer files and weights"
    return (
        f"no ChemBERTa weights for '{model}' offline: download it once with `hf download {model}` "
        "or pass --model DIR holding config.json, tokenizer files and model.safetensors"
    )


def weights_file(model_dir):
    """The checkpoint file in a model folder (safetensors preferred), or None."""
    return next((Path(model_dir) / name for name in WEIGHT_FILES if (Path(model_dir) / name).is_file()), None)


def resolve_model_dir(model):
    """A local directory holding the model: `model` itself, or its snapshot in the Hugging Face cache."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(model), local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError, OSError):
        raise UserError(offline_hint(model)) from None


@dataclasses.dataclass(frozen=True)
class ChemBERTa:
    tokenizer: object
    config: EncoderConfig
    encoder: RobertaEncoder


def load_chemberta(model=DEFAULT_MODEL):
    """Tokenizer, config and encoder weights of a ChemBERTa model, from disk only."""
    from transformers import AutoConfig, AutoTokenizer

    model_dir = resolve_model_dir(model)
    if weights_file(model_dir) is None:  # fail before the slower tokenizer load
        raise UserError(offline_hint(model))
    try:
        hf_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"{offline_hint(model)} ({str(err).splitlines()[0]})") from None
    config = encoder_config(hf_config)
    check_tokenizer(tokenizer, config, model_dir)
    return ChemBERTa(tokenizer, config, load_encoder(read_checkpoint(model_dir), config))


def check_tokenizer(tokenizer, config: EncoderConfig, model_dir):
    """Refuse a tokenizer that cannot feed these weights: without its vocabulary files transformers
    builds one of special tokens only, which maps every SMILES to the same ids (identical embeddings)."""
    vocab = tokenizer.get_vocab()
    if not set(vocab) - set(tokenizer.all_special_tokens):
        raise UserError(f"{model_dir}: the ChemBERTa tokenizer has no vocabulary beyond its special tokens; "
                        "the folder needs the model's tokenizer files (vocab.json and merges.txt, or tokenizer.json)")
    size = max(vocab.values()) + 1
    if size > config.vocab_size:
        raise UserError(f"{model_dir}: the ChemBERTa tokenizer has ids up to {size - 1}, but config.json has "
                        f"vocab_size {config.vocab_size}; tokenizer and weights are from different models")


def pool(hidden, attention_mask, pooling):
    """One vector per sequence: first-token state ('cls') or mean over real tokens ('mean')."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask[..., None].astype(hidden.dtype)
    return (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode(graphdef, params, input_ids, attention_mask):
    return nnx.merge(graphdef, params)(input_ids, attention_mask)


def last_hidden_state(encoder, input_ids, attention_mask):
    """Jitted forward pass: [batch, length, hidden] (eager NNX dispatches op by op, which is far slower)."""
    graphdef, params = nnx.split(encoder)
    return _encode(graphdef, params, jnp.asarray(input_ids), jnp.asarray(attention_mask))


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling"))
def _embed_batch(graphdef, params, input_ids, attention_mask, pooling):
    return pool(_encode(graphdef, params, input_ids, attention_mask), attention_mask, pooling)


def padded_length(length, max_tokens, smallest=16):
    """Round up to a power of two (capped at max_tokens) so few distinct shapes get compiled."""
    return min(max(smallest, 1 << (length - 1).bit_length()), max_tokens)


def tokenize(tokenizer, smiles, max_tokens):
    """Token ids per SMILES (with special tokens), truncated to what the position table holds."""
    return tokenizer(list(smiles), truncation=True, max_length=max_tokens)["input_ids"]


def embed_token_ids(encoder, config: EncoderConfig, token_ids, *, pooling="cls", batch_size=64, names=None):
    """[n, hidden] float32 embeddings; batches are grouped by length and padded to fixed shapes.

    `names[i]` (default: 'sequence i') labels input i in errors. Ids outside the embedding table and
    non-finite outputs are refused: nnx.Embed returns NaN for such ids instead of failing.
    """
    if pooling not in POOLINGS:
        raise UserError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    label = (lambda row: names[row]) if names is not None else (lambda row: f"sequence {row}")
    for row, ids in enumerate(token_ids):
        bad = [i for i in ids if not 0 <= i < config.vocab_size]
        if bad:
            raise UserError(f"ChemBERTa token id {bad[0]} of {label(row)} is outside the model's vocabulary "
                            f"(vocab_size {config.vocab_size}); tokenizer and weights do not match")
    graphdef, params = nnx.split(encoder)
    order = np.argsort([len(ids) for ids in token_ids], kind="stable")
    out = np.zeros((len(token_ids), config.hidden_size), np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        length = padded_length(max(len(token_ids[r]) for r in rows), config.max_tokens)
        input_ids = np.full((batch_size, length), config.pad_token_id, np.int32)
        attention_mask = np.zeros((batch_size, length), np.int32)
        for slot, row in enumerate(rows):
            input_ids[slot, : len(token_ids[row])] = token_ids[row]
            attention_mask[slot, : len(token_ids[row])] = 1
        pooled = _embed_batch(graphdef, params, jnp.asarray(input_ids), jnp.asarray(attention_mask), pooling)
        out[rows] = np.asarray(pooled)[: len(rows)]
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise UserError(f"ChemBERTa embedding of {label(row)} is not finite; "
                        "do the checkpoint's weights hold NaN or Inf?")
    return out


def embed_with(chemberta: ChemBERTa, smiles: Sequence[str], *, pooling="cls", batch_size=64):
    """Embedding of each SMILES by a loaded model: float32 [n_smiles, hidden_size]."""
    token_ids = tokenize(chemberta.tokenizer, smiles, chemberta.config.max_tokens)
    names = [f"SMILES {text!r}" for text in smiles]
    return embed_token_ids(chemberta.encoder, chemberta.config, token_ids, pooling=pooling, batch_size=batch_size,
                           names=names)


def embed_smiles(smiles: Sequence[str], model=DEFAULT_MODEL, *, pooling="cls", batch_size=64):
    """ChemBERTa embedding of each SMILES: float32 [n_smiles, hidden_size]."""
    return embed_with(load_chemberta(model), smiles, pooling=pooling, batch_size=batch_size)
