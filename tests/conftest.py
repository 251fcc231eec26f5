"""Shared fixtures: tiny random Llama and GPT-2 models and a tokenizer built in-process (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 128


def cpu_description() -> str:
    """The CPU model and the SIMD features that decide float rounding paths (PyTorch's and llama.cpp's)."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    features = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
    simd = [flag for flag in features if flag in flags]
    return f"{model} ({' '.join(simd) or 'no x86 SIMD flags read'})"


def llama_cpp_build() -> str:
    """llama-cpp-python's version and llama.cpp's own report of the CPU features it was built for and uses."""
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python not installed"
    info = llama_cpp.llama_print_system_info()
    info = info.decode() if isinstance(info, bytes) else str(info)
    return f"llama-cpp-python {llama_cpp.__version__}: {info.strip()}"


def pytest_report_header(config):
    import torch

    return [
        f"cpu: {cpu_description()}",
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()} kernels)",
        llama_cpp_build(),
    ]


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_gpt2_config(**overrides):
    from transformers import GPT2Config

    values = dict(
        vocab_size=TINY_VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2
    )
    values.update(overrides)
    return GPT2Config(**values)


@pytest.fixture
def tiny_llama():
    """A 4-layer Llama with a 96-token vocabulary, seeded."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def tiny_gpt2():
    """A 4-layer GPT-2 with a 96-token vocabulary, seeded."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(tiny_gpt2_config()).eval()


def make_tiny_tokenizer(texts: list[str] | None = None, vocab_size: int = TINY_VOCAB):
    """A character-level BPE tokenizer over printable ASCII plus a few merges, trained in-process.

    Exactly ``vocab_size`` tokens: 4 specials, the 100 printable ASCII characters, then merges learned on
    ``texts``; any other character becomes ``<unk>``.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts or [SAMPLE_TEXT]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=list(string.printable),
        limit_alphabet=len(string.printable),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    assert len(fast) <= vocab_size, len(fast)
    return fast


SAMPLE_TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "for i in range(10):\n    print(i * i)\n"
)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def text_corpus(tmp_path):
    """A folder of 40 small Python-like files (enough for a train/eval split)."""
    root = tmp_path / "corpus"
    root.mkdir()
    for index in range(40):
        body = "".join(f"def f{index}_{j}(x):\n    return x * {j} + {index}\n\n" for j in range(3 + index % 5))
        (root / f"module_{index:02d}.py").write_text(body + SAMPLE_TEXT)
    return root


@pytest.fixture
def tiny_teacher_dir(tmp_path, tiny_tokenizer):
    """A tiny Llama teacher with a matching tokenizer saved as a local folder (what --teacher takes)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    folder = tmp_path / "teacher"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct teacher and tokenizer, loaded once per test session (~20 s)."""
    from distily.teacher.loading import load_teacher

    return load_teacher("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def shared_dataset_cache(tmp_path_factory):
    """One datasets cache for the session, so the standard library is tokenised once for all tests."""
    return tmp_path_factory.mktemp("datasets_cache")


# ----------------------------------------------------------------------------------------------------------------
# Byte-level BPE: what llama.cpp runs (GGUF export tests)

BYTE_VOCAB = 384


def make_byte_bpe_tokenizer(
    texts: list[str] | None = None, vocab_size: int = BYTE_VOCAB, split_regex: str | None = None
):
    """A GPT-2-style byte-level BPE tokenizer trained in-process: 3 specials, the 256 byte symbols, then merges.

    Exactly ``vocab_size`` tokens, so every byte is representable (llama.cpp needs that). ``split_regex``
    replaces GPT-2's built-in regex with a ``Split`` step (the Llama 3 / Qwen 2 layout).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts or [SAMPLE_TEXT, BYTE_SAMPLE_TEXT]
    tokenizer = Tokenizer(models.BPE())
    if split_regex is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    assert len(fast) == vocab_size, len(fast)
    return fast


BYTE_SAMPLE_TEXT = (
    "Distillation trains a small student to match a large teacher. Numbers: 3 33 333 3.14 2025.\n"
    "Unicode: café, naïve, Grüße, 東京, emoji 🦙 — dashes and 'quotes' \"too\".\n"
    "    indented code:\n\tif x >= 10 and y != 'z':\n\t\treturn [i ** 2 for i in range(x)]\n"
)


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_byte_bpe_tokenizer()
