"""Tiny random models of every supported family, for fast CPU tests."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

VOCAB = 61
TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


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


def qwen3() -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(Qwen3Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=40, vocab_size=VOCAB, tie_word_embeddings=False, **TOKENS))


def gemma3() -> Gemma3ForCausalLM:
    # head_dim x heads (32) differs from hidden (24), as in the real models; a sliding window shorter
    # than the test sequences, so sliding and full layers really differ
    return Gemma3ForCausalLM(Gemma3TextConfig(
        hidden_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=40, vocab_size=VOCAB, query_pre_attn_scalar=8, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], **TOKENS))


def phi3() -> Phi3ForCausalLM:
    return Phi3ForCausalLM(Phi3Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
        vocab_size=VOCAB, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                           "partial_rotary_factor": 0.5}, **TOKENS))


def smollm3() -> SmolLM3ForCausalLM:
    return SmolLM3ForCausalLM(SmolLM3Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
        vocab_size=VOCAB, no_rope_layers=[1, 0, 1, 1], **TOKENS))


def olmo2() -> Olmo2ForCausalLM:
    return Olmo2ForCausalLM(Olmo2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
        vocab_size=VOCAB, **TOKENS))


def gpt_neox() -> GPTNeoXForCausalLM:
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40, vocab_size=VOCAB,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        use_parallel_residual=True, **TOKENS))


def gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(
        n_embd=32, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def vit() -> ViTForImageClassification:
    return ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, image_size=8,
        patch_size=4, num_channels=1, num_labels=5))


FAMILIES = {"llama": llama, "llama-untied": lambda: llama(tied=False), "mistral": mistral, "qwen2": qwen2,
            "qwen3": qwen3, "gemma3": gemma3, "phi3": phi3, "smollm3": smollm3, "olmo2": olmo2,
            "gpt_neox": gpt_neox, "gpt2": gpt2, "vit": vit}


def make(name: str, seed: int = 0, dtype: torch.dtype = torch.float64):
    """A tiny model in eval mode, with non-trivial norms and biases so slicing mistakes show."""
    torch.manual_seed(seed)
    model = FAMILIES[name]()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            # norms start at 1 (Gemma's offset norms, and biases, at 0), per-head q/k norms included:
            # perturb every 1-d parameter so that a wrongly sliced one shows
            if p.dim() == 1:
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
