"""Tiny random models of every supported family, for fast CPU tests."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

VOCAB = 61


def llama(tied: bool = True, heads: int = 8, kv_heads: int = 2, layers: int = 4) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=heads * 8, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=48, vocab_size=VOCAB, head_dim=8, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def mistral() -> MistralForCausalLM:
    return MistralForCausalLM(MistralConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
        vocab_size=VOCAB, head_dim=8, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def qwen2() -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM(Qwen2Config(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, intermediate_size=40,
        vocab_size=VOCAB, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(
        n_embd=32, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def vit() -> ViTForImageClassification:
    return ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, image_size=8,
        patch_size=4, num_channels=1, num_labels=5))


FAMILIES = {"llama": llama, "llama-untied": lambda: llama(tied=False), "mistral": mistral, "qwen2": qwen2,
            "gpt2": gpt2, "vit": vit}


def make(name: str, seed: int = 0, dtype: torch.dtype = torch.float64):
    """A tiny model in eval mode, with non-trivial norms and biases so slicing mistakes show."""
    torch.manual_seed(seed)
    model = FAMILIES[name]()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1:  # norms start at 1 and biases at 0: perturb so their slicing is tested
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def inputs(model, batch: int = 3, seq: int = 7, seed: int = 1, pad: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs: token ids with `pad` left-padded positions in the first row, or images."""
    gen = torch.Generator().manual_seed(seed)
    if model.config.model_type == "vit":
        size = model.config.image_size
        return {"pixel_values": torch.randn(batch, 1, size, size, generator=gen, dtype=model.dtype)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def output(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def tokenizer():
    """A word-level fast tokenizer over VOCAB ids (<pad>, <s>, </s>, then w3..), enough to save and reload."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_parent_folder(name: str, path, dtype: torch.dtype = torch.float32):
    """Save a tiny model of a family (with a tokenizer for language models) as a local parent folder."""
    model = make(name, dtype=dtype)
    model.save_pretrained(path)
    if model.config.model_type != "vit":
        tokenizer().save_pretrained(path)
    else:
        from transformers import ViTImageProcessor
        ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5]).save_pretrained(path)
    return model
