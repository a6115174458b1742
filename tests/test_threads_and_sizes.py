"""CPU threads per process (cores divided among the node's training processes, cpu_threads,
OMP_NUM_THREADS) and learned position tables sized to the data unless max_length is set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import plugformer
from plugformer import CapabilityError, ConfigError
from plugformer.model.generation import DecodingConfig, generate
from plugformer.threads import apply_threads, choose_threads

MQAR = [
    "experiment=plain", "model/position=learned", "data.vocab_size=32", "data.seq_len=16", "data.num_pairs=3",
    "data.train_examples=64", "data.val_examples=16", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
]


@pytest.fixture
def four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})


def test_the_cores_are_divided_among_the_processes_of_the_node(four_cores: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_threads({"trainer": {"accelerator": "cpu", "devices": 1}})[0] == 4
    assert choose_threads({"trainer": {"accelerator": "cpu", "strategy": "ddp", "devices": 2}}) == (2, "4 cores / 2 processes")
    assert choose_threads({"trainer": {"devices": [0, 1, 2]}})[0] == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun says how many processes share the node
    assert choose_threads({"trainer": {"devices": 1}})[0] == 1


def test_cpu_threads_overrides_and_omp_num_threads_is_respected(four_cores: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_threads({"cpu_threads": 3, "trainer": {"devices": 2}}) == (3, "cpu_threads=3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads({"trainer": {"devices": 1}}) == (None, "OMP_NUM_THREADS=1")
    assert choose_threads({"cpu_threads": 2}) == (2, "cpu_threads=2")  # the run's config wins
    for bad in (0, -2, "many", True):
        with pytest.raises(ConfigError, match="cpu_threads"):
            choose_threads({"cpu_threads": bad})


def test_apply_threads_sets_torchs_thread_count(four_cores: None) -> None:
    before = torch.get_num_threads()
    try:
        assert apply_threads({"cpu_threads": 1}) == "1 CPU thread per process (cpu_threads=1)"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_learned_table_is_sized_to_the_data_and_recorded_in_the_config(tmp_path: Path) -> None:
    cfg = plugformer.compose([*MQAR, f"paths.cache_dir={tmp_path}"])
    assert cfg.model.position.max_length is None
    built = plugformer.build(cfg)
    table = built.model.decoder.position.table
    assert table.num_embeddings == built.data.max_length == 16
    assert cfg.model.position.max_length == 16  # what config.yaml records, so eval and resume rebuild 16 rows
    assert built.chosen["position"].config.max_length == 16
    assert built.model.max_positions == 16


def test_an_explicit_max_length_is_kept_and_refused_when_too_small(tmp_path: Path) -> None:
    built = plugformer.build(plugformer.compose([*MQAR, "model.position.max_length=40", f"paths.cache_dir={tmp_path}"]))
    assert built.model.decoder.position.table.num_embeddings == 40
    with pytest.raises(CapabilityError, match="at most 8 positions"):
        plugformer.build(plugformer.compose([*MQAR, "model.position.max_length=8", f"paths.cache_dir={tmp_path}"]))


def test_generation_beyond_the_table_is_refused_before_decoding(tmp_path: Path) -> None:
    built = plugformer.build(plugformer.compose([*MQAR, f"paths.cache_dir={tmp_path}"]))
    model = built.model.eval()
    prompt = torch.randint(4, 32, (2, 10))
    assert generate(model, prompt, DecodingConfig(max_new_tokens=7)).shape == (2, 7)  # positions 0..15
    with pytest.raises(ConfigError, match="needs 17 positions") as error:
        generate(model, prompt, DecodingConfig(max_new_tokens=8))
    assert "--max-new-tokens 7" in error.value.message()
