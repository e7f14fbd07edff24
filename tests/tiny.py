"""Tiny models and tokenizers built from a config, saved like real ones, for fast tests.

They go through the same loading code as SmolLM2 and gpt2 (`from_pretrained` on a directory), so
tests exercise the real paths in milliseconds. Weights are random; behaviour tests that need
learning use them with toy rewards.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "i love this so much, what a great day",
    "this is the worst day ever, i hate it",
    "feeling happy and thankful for my friends",
    "so sad and tired of everything today",
    "what a wonderful morning, the sun is out",
    "my phone broke again and i am angry",
    "good luck with the exam tomorrow",
    "bad news, the concert is cancelled",
    "thanks for the lovely gift, best friend",
    "i miss you, nothing is fun without you",
] * 5
SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}


def build_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained on CORPUS, with distinct BOS/EOS/PAD tokens, as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
    )


def build_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-block Llama (SmolLM2's architecture) with hidden size 32, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    """A 2-block GPT-2 (the seeds' architecture) with hidden size 32, saved as safetensors."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_classifier(
    path: Path, labels: tuple[str, ...] = ("NEGATIVE", "POSITIVE"), seed: int = 0
) -> Path:
    """A 1-block BERT sequence classifier with the given label names in id2label."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_encoder(path: Path, seed: int = 0) -> Path:
    """A 1-block BERT encoder (the learned reward's backbone's shape) saved as safetensors."""
    import torch
    from transformers import BertConfig, BertModel

    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
