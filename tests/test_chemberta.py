"""The Flax ChemBERTa port reproduces transformers' RobertaModel, and padding never changes an embedding."""

import numpy as np
import pytest

from scp_jax.errors import UserError
from scp_jax.features import chemberta

SMILES = ["CCO", "c1ccccc1", "CC(=O)Oc1ccccc1C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "O"]

# Sizes of the published ChemBERTa checkpoints' config.json files.
PUBLISHED_CONFIGS = {
    "DeepChem/ChemBERTa-77M-MTR": dict(hidden_size=384, num_hidden_layers=3, num_attention_heads=12,
                                       intermediate_size=464, vocab_size=591, max_position_embeddings=515),
    "DeepChem/ChemBERTa-77M-MLM": dict(hidden_size=384, num_hidden_layers=3, num_attention_heads=12,
                                       intermediate_size=464, vocab_size=591, max_position_embeddings=515),
    "seyonec/ChemBERTa-zinc-base-v1": dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                                           intermediate_size=3072, vocab_size=767, max_position_embeddings=514),
}


def roberta_config(**sizes):
    from transformers import RobertaConfig

    return RobertaConfig(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **sizes)


def char_tokenizer():
    """A character-level SMILES tokenizer with RoBERTa's special tokens, built offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(SMILES) + "BrClFIPS[]@+-#/\\%"))
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=62)


def perturbed(model):
    """Random non-trivial weights everywhere (LayerNorms and biases too), so any mis-mapped tensor shows."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def tiny_config(tokenizer):
    return roberta_config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=37, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tiny_safetensors(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from transformers import RobertaModel

    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    model = perturbed(RobertaModel(tiny_config(tokenizer), add_pooling_layer=False))
    directory = tmp_path_factory.mktemp("tiny_chemberta")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    assert (directory / "model.safetensors").is_file()
    return directory, model, tokenizer


def reference_hidden(model, tokenizer, smiles):
    import torch

    batch = tokenizer(smiles, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return batch["input_ids"].numpy(), batch["attention_mask"].numpy(), hidden.numpy()


def flax_matches(loaded, model, tokenizer):
    """Max |Flax - transformers| of last_hidden_state over the real tokens of a padded batch."""
    input_ids, mask, expected = reference_hidden(model, tokenizer, SMILES)
    assert (mask == 0).any(), "batch must contain padding"
    hidden = np.asarray(chemberta.last_hidden_state(loaded.encoder, input_ids, mask))
    return float(np.abs(hidden - expected)[mask.astype(bool)].max())


def test_flax_hidden_states_match_transformers_on_padded_batch(tiny_safetensors):
    directory, model, tokenizer = tiny_safetensors
    diff = flax_matches(chemberta.load_chemberta(directory), model, tokenizer)
    print(f"max |flax - transformers| = {diff:.2e}")
    assert diff < 1e-4


@pytest.fixture(scope="module")
def loaded(tiny_safetensors):
    return chemberta.load_chemberta(tiny_safetensors[0])


@pytest.mark.parametrize("pooling", chemberta.POOLINGS)
def test_pooled_embedding_matches_transformers_alone_and_in_padded_batch(tiny_safetensors, loaded, pooling):
    _, model, tokenizer = tiny_safetensors
    token_ids = chemberta.tokenize(loaded.tokenizer, SMILES, loaded.config.max_tokens)
    batch = chemberta.embed_token_ids(loaded.encoder, loaded.config, token_ids, pooling=pooling, batch_size=4)
    _, mask, hidden = reference_hidden(model, tokenizer, SMILES)
    weights = mask[..., None]
    expected = hidden[:, 0] if pooling == "cls" else (hidden * weights).sum(1) / weights.sum(1)
    assert batch.dtype == np.float32 and batch.shape == (len(SMILES), 32)
    np.testing.assert_allclose(batch, expected, atol=1e-4)
    for i, ids in enumerate(token_ids):
        alone = chemberta.embed_token_ids(loaded.encoder, loaded.config, [ids], pooling=pooling, batch_size=4)
        np.testing.assert_allclose(alone[0], batch[i], atol=1e-5)


def test_embed_smiles_loads_and_embeds_in_input_order(tiny_safetensors, loaded):
    embedded = chemberta.embed_smiles(SMILES[::-1], tiny_safetensors[0], batch_size=4)
    token_ids = chemberta.tokenize(loaded.tokenizer, SMILES, loaded.config.max_tokens)
    expected = chemberta.embed_token_ids(loaded.encoder, loaded.config, token_ids, batch_size=4)
    np.testing.assert_allclose(embedded, expected[::-1], atol=1e-5)


def test_loads_pytorch_bin_with_roberta_prefix_and_ignores_lm_head(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import RobertaForMaskedLM

    torch.manual_seed(1)
    tokenizer = char_tokenizer()
    mlm = perturbed(RobertaForMaskedLM(tiny_config(tokenizer)))
    torch.save(mlm.state_dict(), tmp_path / "pytorch_model.bin")
    mlm.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert any(k.startswith("lm_head.") for k in mlm.state_dict())
    assert all(k.startswith(("roberta.", "lm_head.")) for k in mlm.state_dict())
    assert flax_matches(chemberta.load_chemberta(tmp_path), mlm.roberta, tokenizer) < 1e-4


def random_checkpoint(config, seed=0):
    """Tensors named and shaped like a transformers RobertaModel state dict (Linear weights are [out, in])."""
    rng = np.random.default_rng(seed)
    h, i = config.hidden_size, config.intermediate_size
    shapes = {
        "roberta.embeddings.word_embeddings.weight": (config.vocab_size, h),
        "roberta.embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
        "roberta.embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
        "roberta.embeddings.LayerNorm.weight": (h,),
        "roberta.embeddings.LayerNorm.bias": (h,),
        "lm_head.dense.weight": (h, h),
    }
    for n in range(config.num_hidden_layers):
        layer = f"roberta.encoder.layer.{n}"
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes |= {f"{layer}.{name}.weight": (h, h), f"{layer}.{name}.bias": (h,)}
        shapes |= {f"{layer}.intermediate.dense.weight": (i, h), f"{layer}.intermediate.dense.bias": (i,),
                   f"{layer}.output.dense.weight": (h, i), f"{layer}.output.dense.bias": (h,)}
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes |= {f"{layer}.{norm}.weight": (h,), f"{layer}.{norm}.bias": (h,)}
    return {k: 0.02 * rng.standard_normal(shape, dtype=np.float32) for k, shape in shapes.items()}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_published_chemberta_configs_load_and_run(name, tmp_path):
    """A checkpoint shaped like each published model loads (safetensors, `roberta.` keys, LM head) and runs."""
    from safetensors.numpy import save_file

    hf_config = roberta_config(**PUBLISHED_CONFIGS[name])
    save_file(random_checkpoint(hf_config), tmp_path / "model.safetensors")
    config = chemberta.encoder_config(hf_config)
    encoder = chemberta.load_encoder(chemberta.read_checkpoint(tmp_path), config)
    token_ids = [[0, 5, 6, 7, 2], [0, 8, 9, 10, 11, 12, 13, 2]]
    embedded = chemberta.embed_token_ids(encoder, config, token_ids, pooling="mean", batch_size=2)
    assert embedded.shape == (2, config.hidden_size) and np.isfinite(embedded).all()
    assert config.max_tokens >= 512


def test_missing_weights_name_where_to_put_them(tmp_path):
    from scp_jax.features.cache import compound_features

    with pytest.raises(UserError, match="`hf download nobody/no-such-chemberta`"):
        chemberta.load_chemberta("nobody/no-such-chemberta")
    with pytest.raises(UserError, match=f"no ChemBERTa model folder {tmp_path / 'gone'}: pass --model DIR"):
        chemberta.load_chemberta(str(tmp_path / "gone"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="the folder needs config.json, tokenizer files and model.safetensors"):
        chemberta.load_chemberta(tmp_path)
    with pytest.raises(UserError, match="no ChemBERTa weights in"):
        compound_features(f"chemberta-model:{tmp_path}", ["CCO"])


def test_cli_and_feature_specs_embed_the_compound_vocabulary(tiny_safetensors, tmp_path, monkeypatch, capsys):
    import pandas as pd

    from scp_jax.features.__main__ import main as features_main
    from scp_jax.features.cache import compound_features

    monkeypatch.setenv("SCP_JAX_CACHE", str(tmp_path / "cache"))
    names = ["Water", "Ethanol", "Aspirin", "Benzene", "Caffeine"]  # same molecules as SMILES, other order
    rows = [dict(cell_type=cell, sm_name=n, sm_lincs_id=n, SMILES=s, control=False, GENE1=1.0)
            for n, s in zip(names, [SMILES[4], SMILES[0], SMILES[2], SMILES[1], SMILES[3]]) for cell in "AB"]
    pd.DataFrame(rows).to_parquet(tmp_path / "de_train.parquet")
    out = tmp_path / "chemberta.npz"
    directory = tiny_safetensors[0]
    features_main(["chemberta", "--model", str(directory), "--data", str(tmp_path / "de_train.parquet"),
                   "--out", str(out), "--batch-size", "4"])
    assert "5 compounds x 32" in capsys.readouterr().out
    stored = np.load(out)
    assert stored["sm_name"].tolist() == sorted(names)
    expected = chemberta.embed_smiles(SMILES, directory, batch_size=4)
    np.testing.assert_allclose(compound_features(f"chemberta:{out}", SMILES), expected, atol=1e-6)
    on_the_fly = compound_features(f"chemberta-model:{directory}", SMILES)
    np.testing.assert_allclose(on_the_fly, expected, atol=1e-6)
    assert len(list((tmp_path / "cache" / "features").glob("chemberta-*.npy"))) == 1
    np.testing.assert_array_equal(compound_features(f"chemberta-model:{directory}", SMILES), on_the_fly)


def test_folder_without_tokenizer_files_or_with_a_bigger_tokenizer_is_refused(tiny_safetensors, tmp_path):
    """transformers silently builds a special-tokens-only tokenizer: every SMILES would embed the same."""
    import json
    import shutil

    directory = tiny_safetensors[0]
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(directory / name, bare / name)
    with pytest.raises(UserError, match="no vocabulary beyond its special tokens"):
        chemberta.load_chemberta(bare)
    small = tmp_path / "small"
    shutil.copytree(directory, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 10}))
    with pytest.raises(UserError, match="has vocab_size 10; tokenizer and weights are from different models"):
        chemberta.load_chemberta(small)


def test_out_of_vocabulary_ids_and_non_finite_embeddings_are_refused():
    """nnx.Embed returns NaN for an id past the table; NaN weights would poison the features file."""
    hf_config = roberta_config(vocab_size=12, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=8, max_position_embeddings=20)
    config = chemberta.encoder_config(hf_config)
    tensors = random_checkpoint(hf_config)
    tensors["roberta.embeddings.word_embeddings.weight"][5] = np.nan
    encoder = chemberta.load_encoder({k.removeprefix("roberta."): v for k, v in tensors.items()}, config)
    assert np.isfinite(chemberta.embed_token_ids(encoder, config, [[0, 6, 2]], batch_size=2)).all()
    with pytest.raises(UserError, match="token id 12 of SMILES 'CCO' is outside the model's vocabulary"):
        chemberta.embed_token_ids(encoder, config, [[0, 6, 2], [0, 12, 2]], batch_size=2, names=["x", "SMILES 'CCO'"])
    with pytest.raises(UserError, match="embedding of sequence 1 is not finite"):
        chemberta.embed_token_ids(encoder, config, [[0, 6, 2], [0, 5, 2]], batch_size=2)
