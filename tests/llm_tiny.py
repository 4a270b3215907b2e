"""A tiny Llama-architecture model with random weights and a tokenizer trained here, saved as a
local HF model directory, for the LLM-method tests (no hub access needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

WORDS = ("the cat sat on a mat and then the dog ran to the house where it found some food . "
         "latent activation example explanation text token highlight answer list python "
         "def class return import value number digit zero one two three four five six seven "
         "eight nine ten [EXPLANATION]: << >> ( ) , \" Example Activations: yes no\n")


def build_tiny_llama(path: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0, vocab_size: int = 400,
                     texts: Sequence[str] = ()) -> Path:
    """Write a random-weight LlamaForCausalLM and its tokenizer (digits 0-9 single tokens) to path. The
    tokenizer is a byte-level BPE of `vocab_size` trained on the prompts' words and `texts` (a larger
    vocabulary makes most words one token, as with a real LLM's tokenizer)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from nlrewrite_core.llm import prompts

    path = Path(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = [WORDS * 3, prompts.EXPLAINER_SYSTEM, prompts.DETECTION_SYSTEM, prompts.SIMULATOR_SYSTEM, *texts]
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    for d in "0123456789":
        assert len(fast(d, add_special_tokens=False)["input_ids"]) == 1
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path
