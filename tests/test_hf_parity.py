"""Parity with Hugging Face transformers (issue 13 part 3): tiny random GPT-2 and Llama
models built from configs (no downloads) are imported with ``plugformer import-hf``; the
plugformer model's logits equal HF's within 1e-5 (float32) on the same tokens; exporting
back gives a folder ``AutoModelForCausalLM.from_pretrained`` loads with identical logits;
``generate`` and ``eval`` run on the imported run directory (through the CLI's ``main`` in
this process: the console entry itself is tested in test_cli and test_eval_generate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from plugformer import ConfigError, load_run
from plugformer.cli import main
from plugformer.hf import export_hf, import_hf

transformers = pytest.importorskip("transformers", reason="transformers is a test/extra dependency (pip install -e '.[hf]')")

# The byte tokenizer without sentinels has 260 ids; 300 rows leave some unused, as a real
# model's padded vocabulary does (model.vocab_size).
VOCAB = 300
DATA = ["logger=none"]

GPT2 = dict(vocab_size=VOCAB, n_positions=48, n_embd=32, n_layer=2, n_head=4, n_inner=72, layer_norm_epsilon=1e-5)
LLAMA_GQA = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0},
)
LLAMA_SCALED = {
    **LLAMA_GQA, "num_key_value_heads": 1, "head_dim": None, "attention_bias": True, "mlp_bias": True,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}
LLAMA_LINEAR = {**LLAMA_GQA, "tie_word_embeddings": True, "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}}
MODELS = {
    "gpt2": (transformers.GPT2Config, GPT2),
    "llama_gqa_head_dim": (transformers.LlamaConfig, LLAMA_GQA),
    "llama_llama3_scaling_biases": (transformers.LlamaConfig, LLAMA_SCALED),
    "llama_linear_scaling_tied": (transformers.LlamaConfig, LLAMA_LINEAR),
}


def save_random_model(name: str, folder: Path) -> torch.nn.Module:
    """A randomly initialized HF model of ``MODELS[name]`` saved (safetensors) into ``folder``;
    its weights are perturbed so that zero biases and unit norm gains are not all a test sees."""
    config_class, options = MODELS[name]
    torch.manual_seed(7)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**options), attn_implementation="eager").eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(folder)
    return model


def tokens(batch: int = 3, length: int = 40) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(3))


def plugformer_logits(run_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    run = load_run(run_dir, checkpoint="last")
    with torch.no_grad():
        hidden = run.model.hidden_states(run.model.objective.model_inputs({"input_ids": ids}))
        return run.model.objective.head(hidden)


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path, Path]]:
    root = tmp_path_factory.mktemp("hf")
    found = {}
    for name in MODELS:
        model = save_random_model(name, root / f"{name}_hf")
        found[name] = (model, root / f"{name}_hf", import_hf(root / f"{name}_hf", DATA, run_dir=root / f"{name}_run"))
    return found


@pytest.mark.parametrize("name", list(MODELS))
def test_imported_logits_equal_hf(imported, name: str) -> None:
    model, _, run_dir = imported[name]
    ids = tokens()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    got = plugformer_logits(run_dir, ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_export_round_trip_gives_identical_hf_logits(imported, name: str, tmp_path: Path) -> None:
    model, _, run_dir = imported[name]
    out = export_hf(run_dir, tmp_path / "exported", checkpoint="last")
    assert (out / "model.safetensors").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_generate_on_imported_run_matches_hf_greedy(imported, capsys: pytest.CaptureFixture[str]) -> None:
    model, _, run_dir = imported["llama_gqa_head_dim"]
    status = main(["generate", str(run_dir), "--prompt", "hello", "--max-new-tokens", "5", "--checkpoint", "last", "--json"])
    out, err = capsys.readouterr()
    assert status == 0, err[-2000:]
    generated = json.loads(out.strip().splitlines()[-1])["ids"]
    prompt = torch.tensor([load_run(run_dir, checkpoint="last").tokenizer.encode("hello")])
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)[0, prompt.shape[1]:]
    assert generated == expected.tolist()


def test_eval_on_imported_run(imported, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, run_dir = imported["gpt2"]
    status = main(["eval", str(run_dir), "--checkpoint", "last", "--limit-batches", "2"])
    out, err = capsys.readouterr()
    assert status == 0, err[-2000:]
    assert str(run_dir) in out, out
    entry = json.loads((run_dir / "eval.json").read_text())["evaluations"][-1]
    # Random weights over 300 rows: the loss is near log(300) ≈ 5.7, certainly finite.
    assert 3.0 < entry["metrics"]["loss"] < 9.0
    assert entry["batches"] == 2 and "(2 batches" in out


def test_unsupported_architecture_is_one_clear_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    status = main(["import-hf", str(folder), f"run_dir={tmp_path / 'run'}"])  # a traceback would raise here
    err = capsys.readouterr().err
    assert status != 0
    assert "model_type='bert'" in err and err.count("plugformer: error:") == 1, err
    assert not (tmp_path / "run").exists()


def test_unsupported_option_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "dynamic"
    folder.mkdir()
    config = {**LLAMA_GQA, "model_type": "llama", "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="rope_type='dynamic'"):
        import_hf(folder, DATA, run_dir=tmp_path / "run")


def test_export_refuses_what_hf_cannot_express(imported, tmp_path: Path) -> None:
    import shutil

    from omegaconf import OmegaConf

    _, _, run_dir = imported["llama_gqa_head_dim"]
    copy = tmp_path / "interleaved"
    shutil.copytree(run_dir, copy)
    cfg = OmegaConf.load(copy / "config.yaml")
    cfg.model.position.layout = "interleaved"  # same weights, but rotary pairs HF does not use
    (copy / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    with pytest.raises(ConfigError, match="model.position.layout='interleaved'"):
        export_hf(copy, tmp_path / "out", checkpoint="last")
    assert not (tmp_path / "out" / "model.safetensors").exists()
