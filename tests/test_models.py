import json

import pytest
import torch

from montessori.errors import ModelError
from montessori.models import embedded_gguf_path, model_path, model_slug, prepare_model


@pytest.mark.slow
def test_converted_checkpoint_matches_gguf_logits(smol_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path("smollm2-135m-instruct")
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    converted = AutoModelForCausalLM.from_pretrained(smol_dir)
    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    assert "quantization_config" not in json.loads((converted.config.to_json_string()))
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name three primes."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(from_gguf(ids).logits, converted(ids).logits)


def test_local_directory_passes_through(tmp_path, tiny_model_dir):
    card = prepare_model(tiny_model_dir, tmp_path / "card.json", tmp_path / "models")
    assert card["source"] == "local"
    assert model_path(tmp_path / "card.json") == card["path"]


def test_directory_without_config_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="models.student.*no config.json"):
        prepare_model(str(tmp_path / "empty"), tmp_path / "card.json", tmp_path, "models.student")


def test_hub_name_offline_and_not_cached_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelError, match="models.teacher.*HF_HUB_OFFLINE"):
        prepare_model("meta-llama/Meta-Llama-3-8B-Instruct", tmp_path / "card.json", tmp_path, "models.teacher")
    assert not (tmp_path / "card.json").exists()


def test_nonsense_spec_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="not an embedded model"):
        prepare_model("./no/such/dir", tmp_path / "card.json", tmp_path, "models.student")


def test_slug():
    assert model_slug("meta-llama/Meta-Llama-3-8B") == "meta-llama--Meta-Llama-3-8B"
