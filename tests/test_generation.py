"""The generation interface: transformers on the tiny model, vLLM's adapter, the API backend, backend choice."""

from __future__ import annotations

import json
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from montessori.errors import ConfigError
from montessori.generation import APIGenerator, TransformersGenerator, VLLMGenerator, make_generator
from montessori.models import write_model_card

SAMPLING = {"temperature": 1.0, "top_p": 0.9, "repetition_penalty": 1.1, "presence_penalty": 0.0,
            "max_new_tokens": 6}


@pytest.fixture(scope="module")
def tiny_generator(tiny_model_dir):
    return TransformersGenerator(tiny_model_dir, batch_size=2)


def test_transformers_batches_are_reproducible(tiny_generator):
    import torch

    prompts = [tiny_generator.chat_prompt(text) for text in ["Hi", "Name a long river in Africa.", "Why?"]]
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = tiny_generator.generate(prompts, SAMPLING, n=2, seed=7)
    assert torch.rand(1) == before  # the caller's RNG stream is not consumed
    assert [len(outputs) for outputs in first] == [2, 2, 2]
    assert tiny_generator.generate(prompts, SAMPLING, n=2, seed=7) == first
    assert tiny_generator.generate(prompts, SAMPLING, n=2, seed=8) != first


def test_transformers_sampling_does_not_depend_on_the_batch_size(tiny_model_dir, tiny_generator):
    """The batch size is a throughput setting (montessori.runtime): same seeds, same outputs."""
    prompts = [tiny_generator.chat_prompt(text) for text in ["Hi", "Name a long river in Africa.", "Why?", "Ok"]]
    by_batch = {size: TransformersGenerator(tiny_model_dir, batch_size=size).generate(prompts, SAMPLING, n=2, seed=7)
                for size in (1, 3, 4)}
    assert by_batch[1] == by_batch[3] == by_batch[4]
    assert any(texts[0] != texts[1] for texts in by_batch[1]), "siblings of one prompt draw different samples"


def test_a_prompts_samples_depend_on_its_own_seed_only(tiny_generator):
    prompts = [tiny_generator.chat_prompt(text) for text in ["Hi", "Name a long river in Africa.", "Why?"]]
    forward = tiny_generator.generate(prompts, SAMPLING, n=2, seed=[11, 12, 13])
    backward = tiny_generator.generate(prompts[::-1], SAMPLING, n=2, seed=[13, 12, 11])
    assert backward == forward[::-1]
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        tiny_generator.generate(prompts, SAMPLING, n=1, seed=[1, 2])


def test_row_sampler_keeps_the_nucleus_and_draws_per_row():
    import torch

    from montessori.generation import _RowSampler

    # Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 < 0.7 before the second).
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2))
    drawn = set()
    for seed in range(40):
        out = _RowSampler([seed, seed + 100], temperature=1.0, top_p=0.7)(None, scores)
        assert torch.isfinite(out).sum(dim=-1).tolist() == [1, 1]
        drawn |= set(out.argmax(dim=-1).tolist())
    assert drawn == {0, 1}
    same = [_RowSampler([5, 5], 1.0, 1.0)(None, scores).argmax(dim=-1) for _ in range(2)]
    assert torch.equal(same[0], same[1]) and same[0][0] == same[0][1]


def test_transformers_left_padding_matches_single_prompts(tiny_generator):
    greedy = {**SAMPLING, "temperature": 0.0}
    prompts = [tiny_generator.chat_prompt(text) for text in ["Hi", "Name a long river in Africa, please."]]
    batched = tiny_generator.generate(prompts, greedy, n=1, seed=0)
    single = [tiny_generator.generate([prompt], greedy, n=1, seed=0)[0] for prompt in prompts]
    assert batched == single
    with pytest.raises(ConfigError, match="greedy"):
        tiny_generator.generate(prompts, greedy, n=2, seed=0)


def test_prefill_is_appended_to_the_chat_prompt(tiny_generator):
    prompt = tiny_generator.chat_prompt("Say hi", "<task>")
    assert prompt.endswith("<|im_start|>assistant\n<task>")


def test_backend_choice(tmp_path, tiny_model_dir, monkeypatch):
    card = tmp_path / "teacher.json"
    write_model_card(card, tiny_model_dir)
    import montessori.generation as generation

    monkeypatch.setattr(generation, "vllm_available", lambda: False)
    assert isinstance(make_generator({"backend": "auto", "batch_size": 3}, card), TransformersGenerator)
    with pytest.raises(ConfigError, match="'backend'"):
        make_generator({"backend": "tensorrt"}, card)
    monkeypatch.setattr(generation.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="vllm is not installed"):
        make_generator({"backend": "vllm"}, card)
    api = make_generator({"backend": "auto", "external_teacher": {"base_url": "http://x/v1", "model": "m",
                                                                   "api_key_env": "KEY"}}, card)
    assert isinstance(api, APIGenerator) and not api.supports_prefill
    with pytest.raises(ConfigError, match="external_teacher.base_url"):
        make_generator({"external_teacher": {"base_url": None, "model": "m"}}, card)


def test_vllm_adapter_passes_token_ids_and_one_seed_per_prompt(tiny_model_dir, monkeypatch):
    calls = {}

    class FakeSamplingParams:
        def __init__(self, **kwargs):
            assert "best_of" not in kwargs
            self.kwargs = kwargs

    class FakeLLM:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def generate(self, inputs, params, use_tqdm):
            calls["inputs"], calls["params"] = inputs, params
            choice = types.SimpleNamespace
            return [types.SimpleNamespace(outputs=[choice(index=1, text=f"p{i}-b"), choice(index=0, text=f"p{i}-a")])
                    for i in range(len(inputs))]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeSamplingParams))
    generator = VLLMGenerator(tiny_model_dir, seed=5)
    prompts = [generator.chat_prompt("one"), generator.chat_prompt("two")]
    assert generator.generate(prompts, {**SAMPLING, "presence_penalty": 0.5}, n=2, seed=9) == [["p0-a", "p0-b"],
                                                                                              ["p1-a", "p1-b"]]
    assert calls["init"]["model"] == tiny_model_dir and calls["init"]["seed"] == 5
    first_ids = calls["inputs"][0]["prompt_token_ids"]
    assert first_ids == generator.tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    kwargs = [params.kwargs for params in calls["params"]]
    assert kwargs[0]["n"] == 2 and kwargs[0]["max_tokens"] == 6 and kwargs[0]["presence_penalty"] == 0.5
    assert kwargs[0]["seed"] != kwargs[1]["seed"]


class _ChatServer(BaseHTTPRequestHandler):
    """An OpenAI-style endpoint that, like some servers, returns one choice whatever `n` says."""

    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _ChatServer.requests.append((self.headers["Authorization"], body))
        text = f"{body['messages'][0]['content']} seed={body['seed']}"
        reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_api_backend_asks_again_until_n_choices(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _ChatServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("TEACHER_KEY", "secret")
        generator = APIGenerator(f"http://127.0.0.1:{server.server_port}/v1", "teacher", "TEACHER_KEY", concurrency=2)
        assert generator.chat_prompt("Write a task.", "<task>") == "Write a task."
        outputs = generator.generate(["A", "B"], SAMPLING, n=2, seed=1)
    finally:
        server.shutdown()
        server.server_close()
    assert [[text.split(" ")[0] for text in texts] for texts in outputs] == [["A", "A"], ["B", "B"]]
    assert len(set(outputs[0])) == 2  # the second ask has its own seed
    assert all(auth == "Bearer secret" and body["max_tokens"] == 6 for auth, body in _ChatServer.requests)
    monkeypatch.delenv("TEACHER_KEY")
    with pytest.raises(ConfigError, match="TEACHER_KEY"):
        APIGenerator("http://127.0.0.1:9/v1", "teacher", "TEACHER_KEY").generate(["A"], SAMPLING, n=1, seed=1)


# A Llama-3-style template whose turns end with <|endoftext|> (id 0 in the SmolLM2 tokenizer),
# while that tokenizer's EOS is <|im_end|>: the situation of a base student given a chat format.
OTHER_TURN_END = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                  "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|endoftext|>' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def turn_end_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with its final norm zeroed: every logit is 0, so greedy decoding picks token 0,
    which is the template's end-of-turn token and not the tokenizer's EOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    out = tmp_path_factory.mktemp("turn-end-model")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return str(out)


def test_transformers_generation_stops_at_the_templates_end_of_turn(turn_end_model_dir):
    generator = TransformersGenerator(turn_end_model_dir, chat_template=OTHER_TURN_END)
    assert generator.tokenizer.eos_token == "<|im_end|>"
    assert generator.tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>"
    lengths = []
    original = generator.model.generate

    def recording_generate(**kwargs):
        sequences = original(**kwargs)
        lengths.append(sequences.shape[1] - kwargs["input_ids"].shape[1])
        return sequences

    generator.model.generate = recording_generate
    greedy = {**SAMPLING, "temperature": 0.0, "max_new_tokens": 12}
    assert generator.generate([generator.chat_prompt("Hi")], greedy, n=1, seed=0) == [[""]]
    assert lengths == [1]  # the end-of-turn token, then nothing: not 12 tokens of it


def test_stop_token_ids_hold_eos_and_the_end_of_turn(tiny_model_dir):
    from montessori.chat import stop_token_ids
    from montessori.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir, OTHER_TURN_END)
    assert sorted(stop_token_ids(tokenizer)) == [0, 2]  # <|endoftext|> ends the turn, <|im_end|> is EOS
    chatml = load_tokenizer(tiny_model_dir)
    assert stop_token_ids(chatml) == [2]  # ChatML ends a turn with <|im_end|>, which is also EOS
    replies_dropped = load_tokenizer(tiny_model_dir, "{% for m in messages %}{% if m['role'] == 'user' %}"
                                                     "{{ m['content'] }}{% endif %}{% endfor %}")
    assert stop_token_ids(replies_dropped) == [2]  # no turn end to read: EOS alone


def test_vllm_adapter_stops_at_the_end_of_turn_and_eos(tiny_model_dir, monkeypatch):
    captured = []

    class FakeSamplingParams:
        def __init__(self, **kwargs):
            captured.append(kwargs)

    class FakeLLM:
        def __init__(self, **kwargs):
            pass

        def generate(self, inputs, params, use_tqdm):
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(index=0, text="x")]) for _ in inputs]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeSamplingParams))
    generator = VLLMGenerator(tiny_model_dir, chat_template=OTHER_TURN_END)
    generator.generate([generator.chat_prompt("one")], SAMPLING, n=1, seed=0)
    assert sorted(captured[0]["stop_token_ids"]) == [0, 2]
