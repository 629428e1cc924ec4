"""Closed-form fusion: matches the least-squares definition, is additive, and runs on real layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.engine.config import FusionConfig, LayerConfig
from workers.engine.fusion import (
    FusionState,
    accumulate,
    collect_grams,
    contribution,
    fuse_request,
    load_state,
    remove,
    save_state,
    solve,
    state_from_tensors,
    state_to_tensors,
)
from workers.engine.layers import create_attached
from workers.engine.testing import tiny_model, tiny_tokenizer

IN, OUT = 6, 3


def random_requests(n: int, rows: int = 40, seed: int = 0):
    """n requests for two maps: ("a" with its own inputs, "b" sharing them) -> (grams, maps, xs)."""
    gen = torch.Generator().manual_seed(seed)
    requests = []
    for _ in range(n):
        x = torch.randn(rows, IN, generator=gen, dtype=torch.float64) * (1 + torch.arange(IN))
        gram = x.t() @ x
        maps = {"a": torch.randn(IN, OUT, generator=gen), "b": torch.randn(IN, OUT, generator=gen)}
        requests.append(({"a": gram, "b": gram}, maps, x))
    return requests


def lstsq_reference(xs, ws, lam: float) -> np.ndarray:
    """argmin_W sum_i ||X_i W - X_i W_i||^2 + lam ||W||^2 as one stacked least-squares problem."""
    lhs = np.vstack([x.numpy() for x in xs] + [np.sqrt(lam) * np.eye(IN)])
    rhs = np.vstack([x.numpy() @ w.double().numpy() for x, w in zip(xs, ws)] + [np.zeros((IN, OUT))])
    return np.linalg.lstsq(lhs, rhs, rcond=None)[0]


def fuse_all(requests) -> FusionState:
    state = None
    for i, (grams, maps, _) in enumerate(requests):
        state = accumulate(state, grams, maps, f"req-{i}")
    return state


def test_solve_matches_least_squares_definition():
    requests = random_requests(3)
    cfg = FusionConfig(ridge=1e-2)
    state = fuse_all(requests)
    lam = cfg.ridge * state.gram_sum["a"].diagonal().mean().item()
    expected = lstsq_reference([x for _, _, x in requests], [m["a"] for _, m, _ in requests], lam)
    np.testing.assert_allclose(solve(state, cfg)["a"].double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_fusing_one_request_returns_its_weights():
    (grams, maps, _), = random_requests(1, rows=200)
    fused = solve(accumulate(None, grams, maps, "only"), FusionConfig(ridge=1e-8))
    assert torch.allclose(fused["a"], maps["a"], atol=1e-5)


def test_state_is_additive_across_save_load_round_trips(tmp_path):
    requests = random_requests(4)
    one_pass = fuse_all(requests)
    state = None
    for i, (grams, maps, _) in enumerate(requests):
        if state is not None:
            save_state(state, tmp_path / f"state{i}.safetensors")
            state = load_state(tmp_path / f"state{i}.safetensors")
        state = accumulate(state, grams, maps, f"req-{i}")
    assert state.request_ids == one_pass.request_ids and state.n_requests == 4
    for name in one_pass.gram_sum:
        assert torch.equal(state.gram_sum[name], one_pass.gram_sum[name])
        assert torch.equal(state.gram_w_sum[name], one_pass.gram_w_sum[name])
    assert all(torch.equal(solve(state)[k], solve(one_pass)[k]) for k in ("a", "b"))


def test_shared_grams_are_stored_once_and_stay_shared():
    state = fuse_all(random_requests(2))
    assert state.gram_sum["a"] is state.gram_sum["b"]
    tensors = state_to_tensors(state)
    assert sum(key.startswith("gram.") for key in tensors) == 1
    again = state_from_tensors(tensors)
    assert again.gram_sum["a"] is again.gram_sum["b"]


def test_same_request_cannot_be_fused_twice():
    (grams, maps, _), = random_requests(1)
    state = accumulate(None, grams, maps, "r1")
    with pytest.raises(ValueError, match="already fused"):
        accumulate(state, grams, maps, "r1")


def test_accumulate_leaves_the_previous_state_unchanged():
    (g1, m1, _), (g2, m2, _) = random_requests(2)
    first = accumulate(None, g1, m1, "r1")
    snapshot = first.gram_sum["a"].clone()
    accumulate(first, g2, m2, "r2")
    assert torch.equal(first.gram_sum["a"], snapshot) and first.request_ids == ["r1"]


def test_removing_a_request_gives_the_fusion_that_never_had_it():
    requests = random_requests(4)
    grams, maps, _ = requests[1]
    stored = state_from_tensors(state_to_tensors(contribution(grams, maps, "req-1"), torch.float32))  # as kept
    without = remove(fuse_all(requests), stored)
    never = fuse_all([r for i, r in enumerate(requests) if i != 1])
    assert without.request_ids == ["req-0", "req-2", "req-3"] and without.n_requests == 3
    assert without.gram_sum["a"] is without.gram_sum["b"]  # sharing survives
    for name in ("a", "b"):
        torch.testing.assert_close(solve(without)[name], solve(never)[name], rtol=1e-4, atol=1e-5)


def test_removing_the_only_request_leaves_zero_maps():
    (grams, maps, _), = random_requests(1)
    state = remove(accumulate(None, grams, maps, "only"), contribution(grams, maps, "only"))
    assert state.n_requests == 0 and state.request_ids == []
    assert all(torch.count_nonzero(w) == 0 for w in solve(state).values())


def test_a_request_that_is_not_in_the_state_cannot_be_removed():
    requests = random_requests(2)
    grams, maps, _ = requests[0]
    with pytest.raises(ValueError, match="not fused"):
        remove(fuse_all(requests), contribution(grams, maps, "someone-else"))


@pytest.fixture(scope="module")
def batches():
    tok = tiny_tokenizer()
    texts = ["Alice was born in Paris.", "Bob", "The sky is blue today, said Carol."]
    return [tok(texts[:2], return_tensors="pt", padding=True), tok(texts[2:], return_tensors="pt")]


def token_count(batches) -> int:
    return int(sum(b["attention_mask"].sum() for b in batches))


def test_collect_grams_bottleneck_shapes_and_padding_masked(batches):
    model = tiny_model("llama")
    attached = create_attached(model, LayerConfig(bottleneck_dim=8))
    grams = collect_grams(model, attached, batches)
    assert grams["blocks.0.down"].shape == (65, 65) and grams["blocks.1.up"].shape == (9, 9)
    assert grams["blocks.0.down"].dtype == torch.float64
    assert grams["blocks.0.down"][-1, -1].item() == token_count(batches)  # ones column counts tokens
    attached.detach()


def test_collect_grams_padding_does_not_change_the_sum():
    tok = tiny_tokenizer()
    texts = ["Alice was born in Paris.", "Bob"]
    model = tiny_model("gpt2")
    attached = create_attached(model, LayerConfig(bottleneck_dim=8))
    padded = collect_grams(model, attached, [tok(texts, return_tensors="pt", padding=True)])
    separate = collect_grams(model, attached, [tok([t], return_tensors="pt") for t in texts])
    assert torch.allclose(padded["blocks.1.down"], separate["blocks.1.down"], rtol=1e-5, atol=1e-6)
    attached.detach()


def test_collect_grams_lora_shares_gate_and_up(batches):
    model = tiny_model("llama")
    attached = create_attached(model, LayerConfig(kind="lora", lora_rank=4))
    grams = collect_grams(model, attached, batches)
    assert grams["blocks.0.gate_proj"] is grams["blocks.0.up_proj"]
    assert grams["blocks.0.gate_proj"].shape == (64, 64)  # no bias row for a LoRA delta
    attached.detach()


@pytest.mark.parametrize("kind", ["bottleneck", "lora"])
def test_fusing_one_trained_layer_reproduces_it_on_its_data(kind, batches):
    model = tiny_model("llama")
    attached = create_attached(model, LayerConfig(kind=kind, bottleneck_dim=8, lora_rank=4), seed=0)
    with torch.no_grad():
        for p in attached.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
        trained = [model(**b).logits for b in batches]
    grams, maps = collect_grams(model, attached, batches), attached.map_weights()
    _, fused = fuse_request(None, grams, maps, "r1", FusionConfig(ridge=1e-9))
    attached.load_map_weights(fused)
    with torch.no_grad():
        for batch, expected in zip(batches, trained):
            mask = batch["attention_mask"].bool()
            assert torch.allclose(model(**batch).logits[mask], expected[mask], atol=1e-3)
    attached.detach()
