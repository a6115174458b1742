"""Reversible blocks: the recomputing backward gives the gradients plain autograd gives on
the same coupling (random draws of dropout and LSH rotations replayed), a stack runs
consecutive reversible blocks as one sequence, and peak memory of forward+backward grows
far less with depth than with standard blocks (measured in fresh processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import small_context
from plugformer import BlockParts, ConfigError, StepInputs, run_reversible
from plugformer.model.transformer import Stack

REPO = Path(__file__).resolve().parents[1]


def make_blocks(registry, n: int, *, attention: str = "reformer", ffn: str = "mlp", dropout: float = 0.1,
                ffn_chunks: int = 1, kinds: list[str] | None = None) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    blocks = []
    for i, kind in enumerate(kinds or ["reversible"] * n):
        ctx = small_context(dropout=dropout, layer_index=i)
        attention_component = registry.get("attention", attention)
        options = {"n_buckets": 4, "chunk_size": 4} if attention == "reformer" else {}
        ffn_component = registry.get("ffn", ffn)
        parts = BlockParts(
            attention=attention_component.factory(attention_component.config(**options), ctx),
            ffn=ffn_component.factory(ffn_component.config(), ctx),
            make_norm=lambda: torch.nn.LayerNorm(ctx.d_model),
        )
        block = registry.get("block", kind)
        config = block.config(ffn_chunks=ffn_chunks) if kind == "reversible" else block.config()
        blocks.append(block.factory(config, ctx, parts))
    return [b.double() for b in blocks]


def plain_coupling(blocks, x, inputs):
    """The same coupling under ordinary autograd, as the definition reads."""
    x1 = x2 = x
    for block in blocks:
        x1 = x1 + block.f(x2, inputs, None)
        pieces = x1.chunk(block.g_chunks, dim=1) if block.g_chunks > 1 else [x1]
        x2 = x2 + torch.cat([block.g(p) for p in pieces], dim=1)
    return (x1 + x2) / 2


def gradients(blocks, run, x, inputs, seed: int):
    params = [p for b in blocks for p in b.parameters()]
    x = x.clone().requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = run(blocks, x, inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), [x, *params], allow_unused=True)
    return out.detach(), grads


@pytest.mark.parametrize("ffn_chunks", [1, 3], ids=["whole ffn", "ffn in 3 chunks"])
@pytest.mark.parametrize("attention", ["reformer", "full"])
def test_reversible_gradients_equal_plain_autograd(registry, attention: str, ffn_chunks: int) -> None:
    blocks = make_blocks(registry, 4, attention=attention, ffn_chunks=ffn_chunks)
    for block in blocks:
        block.train()
    length = 16
    x = torch.randn(2, length, 32, dtype=torch.float64)
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, -4:] = False
    inputs = StepInputs(mask=mask, positions=torch.arange(length)[None])
    out, grads = gradients(blocks, lambda b, x, i: run_reversible(b, x, i), x, inputs, seed=3)
    expected_out, expected = gradients(blocks, plain_coupling, x, inputs, seed=3)
    torch.testing.assert_close(out, expected_out)
    names = ["input"] + [n for b in blocks for n, _ in b.named_parameters()]
    for name, got, want in zip(names, grads, expected):
        if want is None:
            assert got is None or not got.any(), name
            continue
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")
    # A different seed draws other rotations and dropout masks: the comparison above is not vacuous.
    other, _ = gradients(blocks, plain_coupling, x, inputs, seed=4)
    assert not torch.allclose(other, expected_out)


def test_backward_leaves_the_random_stream_alone(registry) -> None:
    blocks = make_blocks(registry, 2)
    x = torch.randn(2, 8, 32, dtype=torch.float64, requires_grad=True)
    inputs = StepInputs(mask=None, positions=torch.arange(8)[None])
    torch.manual_seed(5)
    run_reversible(blocks, x, inputs).sum().backward()
    after_backward = torch.rand(3)
    torch.manual_seed(5)
    with torch.no_grad():
        run_reversible(blocks, x, inputs)
    torch.testing.assert_close(after_backward, torch.rand(3))


def test_stack_runs_consecutive_reversible_blocks_as_one_sequence(registry) -> None:
    kinds = ["reversible", "reversible", "standard", "reversible"]
    blocks = make_blocks(registry, 4, attention="full", dropout=0.0, kinds=kinds)
    position = registry.get("position", "none")
    stack = Stack("decoder", position.factory(position.config(), small_context()), blocks,
                  torch.nn.Identity(), 0.0).double()
    x = torch.randn(2, 10, 32, dtype=torch.float64, requires_grad=True)
    inputs = StepInputs(mask=None, positions=torch.arange(10)[None])
    expected = plain_coupling(blocks[:2], x, inputs)
    expected = blocks[2](expected, inputs)
    expected = plain_coupling(blocks[3:], expected, inputs)
    got = stack(x, mask=None)
    torch.testing.assert_close(got, expected)
    params = list(stack.parameters())
    grads = torch.autograd.grad(got.sum(), [x, *params])
    want = torch.autograd.grad(expected.sum(), [x, *params])
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


def test_a_feed_forward_with_auxiliary_losses_is_refused(registry) -> None:
    with pytest.raises(ConfigError, match="auxiliary losses"):
        make_blocks(registry, 1, ffn="moe")


def peak_mib(blocks_and_depths: list[tuple[str, int]]) -> list[float]:
    """Peak memory of forward+backward per (block, depth), each in its own fresh process
    (run side by side: resident memory is per process)."""
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1",
           "PATH": "/usr/bin:/bin"}
    running = []
    for block, depth in blocks_and_depths:
        spec = {"block": block, "attention": "full", "depth": depth, "length": 512, "batch": 4, "d_model": 128,
                "heads": 4, "device": "cpu", "repeats": 0, "threads": 1}
        command = [sys.executable, str(REPO / "benchmarks" / "reversible_memory.py"), "--worker", json.dumps(spec)]
        running.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO))
    results = []
    for process in running:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1])["memory_mib"])
    return results


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read peak memory")
def test_reversible_memory_grows_much_less_with_depth() -> None:
    standard_2, standard_6, reversible_2, reversible_6 = peak_mib(
        [("standard", 2), ("standard", 6), ("reversible", 2), ("reversible", 6)]
    )
    standard, reversible = standard_6 - standard_2, reversible_6 - reversible_2
    # Four more standard layers store about 15 activations of (4, 512, 128) floats each (≈ 60 MiB).
    assert standard > 25, f"standard blocks grew by only {standard:.1f} MiB: the measurement is broken"
    assert reversible < 0.2 * standard, f"reversible +{reversible:.1f} MiB vs standard +{standard:.1f} MiB for 4 layers"
