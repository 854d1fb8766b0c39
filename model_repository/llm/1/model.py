"""Triton python-backend model: decoupled causal-LM generation, one response per token.

Serves any Hugging Face causal-LM dir (parameter `model_dir`, else env MLMESH_LLM_MODEL_DIR).
Every response carries `text` (this step's text delta), `finish_reason` ("" until the last
response, then "stop", "length" or "cancelled"), `input_tokens` and `output_tokens` (so far).
The last response carries the FINAL flag: tritonclient's aio stream has no empty final response.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Set before transformers/huggingface_hub are imported: they read these once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_MAX_TOKENS = 64
MAX_TOKENS_CAP = 2048
DEFAULT_TEMPERATURE = 0.0
DEFAULT_TOP_P = 1.0
# Generation is sequential per token; more threads than this only contend with Triton's own.
TORCH_THREADS = 2
MODEL_DIR_ENV = "MLMESH_LLM_MODEL_DIR"
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class InvalidRequest(ValueError):
    """The request's inputs are unusable; reported to the caller as INVALID_ARG."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas without splitting multi-byte characters.

    A byte-level token can end inside a UTF-8 character, and decoding then ends with U+FFFD:
    such text is held back until a later token completes the character. Decoding a short
    window (from the previous emit point) keeps each step cheap and gives tokenizers whose
    pieces depend on their neighbour the context they need.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._token_ids: list[int] = []
        self._window_start = 0
        self._emitted_upto = 0

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(
            self._token_ids[start:end], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def _take_delta(self, hold_incomplete: bool) -> str:
        emitted_text = self._decode(self._window_start, self._emitted_upto)
        window_text = self._decode(self._window_start)
        if hold_incomplete and (window_text.endswith("\ufffd") or len(window_text) <= len(emitted_text)):
            return ""
        self._window_start, self._emitted_upto = self._emitted_upto, len(self._token_ids)
        return window_text[len(emitted_text) :]

    def push(self, token_id: int) -> str:
        self._token_ids.append(token_id)
        return self._take_delta(hold_incomplete=True)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        return self._take_delta(hold_incomplete=False)


def _optional_scalar(request: Any, name: str) -> Any | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise InvalidRequest(f"input {name!r} must hold exactly one value, got {values.size}")
    return values[0].item()


def parse_request(request: Any) -> GenerationRequest:
    prompt_values = pb_utils.get_input_tensor_by_name(request, "prompt").as_numpy().reshape(-1)
    if prompt_values.size != 1:
        raise InvalidRequest(f"input 'prompt' must hold exactly one string, got {prompt_values.size}")
    raw_prompt = prompt_values[0]
    try:
        prompt = raw_prompt.decode("utf-8") if isinstance(raw_prompt, bytes) else str(raw_prompt)
    except UnicodeDecodeError as error:
        raise InvalidRequest(f"prompt is not valid UTF-8: {error}") from error
    if not prompt:
        raise InvalidRequest("prompt must not be empty")

    max_tokens = _optional_scalar(request, "max_tokens")
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else int(max_tokens)
    if max_tokens <= 0:
        raise InvalidRequest(f"max_tokens must be positive, got {max_tokens}")

    temperature = _optional_scalar(request, "temperature")
    temperature = DEFAULT_TEMPERATURE if temperature is None else float(temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest(f"temperature must be >= 0, got {temperature}")

    top_p = _optional_scalar(request, "top_p")
    top_p = DEFAULT_TOP_P if top_p is None else float(top_p)
    if not 0 < top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}")

    seed = _optional_scalar(request, "seed")
    return GenerationRequest(
        prompt=prompt,
        max_tokens=min(max_tokens, MAX_TOKENS_CAP),
        temperature=temperature,
        top_p=top_p,
        seed=None if seed is None else int(seed),
    )


def _string_tensor(name: str, value: str) -> Any:
    return pb_utils.Tensor(name, np.array([value.encode("utf-8")], dtype=np.object_))


def token_response(text: str, finish_reason: str, input_tokens: int, output_tokens: int) -> Any:
    return pb_utils.InferenceResponse(
        output_tensors=[
            _string_tensor("text", text),
            _string_tensor("finish_reason", finish_reason),
            pb_utils.Tensor("input_tokens", np.array([input_tokens], dtype=np.int32)),
            pb_utils.Tensor("output_tokens", np.array([output_tokens], dtype=np.int32)),
        ]
    )


def error_response(message: str, code: int) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def pick_token(logits: torch.Tensor, request: GenerationRequest, generator: torch.Generator | None) -> int:
    """Greedy without a generator (temperature 0), else temperature + top-p sampling."""
    if generator is None:
        return int(torch.argmax(logits))
    probabilities = torch.softmax(logits.float() / request.temperature, dim=-1)
    sorted_probabilities, sorted_ids = torch.sort(probabilities, descending=True)
    # Nucleus: keep the smallest head of the distribution whose mass reaches top_p
    # (the first token always stays, whatever top_p is).
    mass_before = torch.cumsum(sorted_probabilities, dim=-1) - sorted_probabilities
    sorted_probabilities = sorted_probabilities * (mass_before < request.top_p)
    choice = torch.multinomial(sorted_probabilities, num_samples=1, generator=generator)
    return int(sorted_ids[choice])


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        started = time.monotonic()
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        model_dir = parameters.get("model_dir") or os.environ.get(MODEL_DIR_ENV, "")
        if not model_dir:
            raise ValueError(f"no model to serve: set the model parameter 'model_dir' or the env var {MODEL_DIR_ENV}")
        if not Path(model_dir).is_dir():
            raise ValueError(f"model_dir {model_dir!r} is not a directory")

        chat_setting = parameters.get("use_chat_template", "").strip().lower()
        if chat_setting not in ("", "true", "false"):
            raise ValueError(f"use_chat_template must be 'true' or 'false', got {chat_setting!r}")

        torch.set_num_threads(TORCH_THREADS)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

        has_template = bool(self.tokenizer.chat_template)
        if chat_setting == "true" and not has_template:
            raise ValueError(f"use_chat_template is true but the tokenizer in {model_dir} has no template")
        self.use_chat_template = has_template if chat_setting == "" else chat_setting == "true"

        eos_ids = self.model.generation_config.eos_token_id
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.append(self.tokenizer.eos_token_id)
        self.stop_token_ids = frozenset(eos_ids)
        pb_utils.Logger.log_info(
            f"llm: loaded {model_dir} in {time.monotonic() - started:.1f} s "
            f"(chat template: {self.use_chat_template}, stop tokens: {sorted(self.stop_token_ids)})"
        )

    def execute(self, requests: list[Any]) -> None:
        # Decoupled: responses go through each request's sender; execute returns nothing.
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._generate(parse_request(request), sender)
            except InvalidRequest as error:
                sender.send(error_response(str(error), pb_utils.TritonError.INVALID_ARG), flags=FINAL)
            except Exception as error:  # one failed request must not take the instance down
                pb_utils.Logger.log_error(f"llm: generation failed: {error!r}")
                sender.send(error_response(f"generation failed: {error}", pb_utils.TritonError.INTERNAL), flags=FINAL)

    def _encode_prompt(self, prompt: str) -> list[int]:
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            # The template already wrote every special token the model expects.
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt)["input_ids"]

    @torch.inference_mode()
    def _generate(self, request: GenerationRequest, sender: Any) -> None:
        input_ids = self._encode_prompt(request.prompt)
        input_tokens = len(input_ids)
        max_tokens = request.max_tokens
        if self.context_length:
            if input_tokens >= self.context_length:
                raise InvalidRequest(f"prompt is {input_tokens} tokens; the model's context is {self.context_length}")
            max_tokens = min(max_tokens, self.context_length - input_tokens)

        generator = None
        if request.temperature > 0:
            generator = torch.Generator()
            if request.seed is None:
                generator.seed()
            else:
                generator.manual_seed(request.seed)

        detokenizer = IncrementalDetokenizer(self.tokenizer)
        next_input = torch.tensor([input_ids])
        past_key_values = None
        for output_tokens in range(1, max_tokens + 1):
            # A hung-up client cancels the request: stop before spending another forward pass.
            if sender.is_cancelled():
                pb_utils.Logger.log_info(f"llm: request cancelled after {output_tokens - 1} of {max_tokens} tokens")
                sender.send(token_response("", "cancelled", input_tokens, output_tokens - 1), flags=FINAL)
                return
            outputs = self.model(
                input_ids=next_input, past_key_values=past_key_values, use_cache=True, logits_to_keep=1
            )
            past_key_values = outputs.past_key_values
            token_id = pick_token(outputs.logits[0, -1], request, generator)

            if token_id in self.stop_token_ids:
                sender.send(token_response(detokenizer.flush(), "stop", input_tokens, output_tokens), flags=FINAL)
                return
            text = detokenizer.push(token_id)
            if output_tokens == max_tokens:
                text += detokenizer.flush()
                sender.send(token_response(text, "length", input_tokens, output_tokens), flags=FINAL)
                return
            sender.send(token_response(text, "", input_tokens, output_tokens))
            next_input = torch.tensor([[token_id]])
