"""The stored-state attack (issue 13): do the Gram matrices that fusion keeps reveal the forget text?

Fusion keeps, per version, sum_i G_i with G_i = X_i^T X_i over request i's forget tokens, X the input of
every unlearning map. The attacker holds the public base model and a stolen state file. For the first map
(the bottleneck after block 0; its input x_t is block 0's feed-forward output, mostly a function of the
token itself) they compute x_v for every vocabulary token v after a short chat prefix, and score the share
of x_v that lies in the top-k eigenvectors U_k of the stolen Gram (the directions the forget tokens span):

    s_v = ||U_k^T x_v||^2 / ||x_v||^2

The highest-scoring ordinary tokens are the guess at the forget text. Measured on the default model (4
items about a made-up person, k = 64): 22 of the top 40 guesses are tokens of the forget text that
ordinary text does not use (" Fen", " Br"+"indle", " Har"+"gate", " Qu", " Ter", " Clinic", " physician",
" badge", "Dr", ...), out of a 49k-token vocabulary. Other scores (the Rayleigh quotient, a ratio against
a Gram of ordinary text, the token alone at position 0) were drowned by special and junk tokens. So the
service never writes the state in the clear:
a version's fusion state is sealed (AES-GCM, key outside the store, service/domain/sealing.py), and the
same attack on the stored file has nothing to read.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from service.domain.sealing import fusion_state_sealer
from workers.engine.blocks import find_ffn_blocks
from workers.engine.config import LayerConfig, TrainConfig
from workers.engine.data import Example
from workers.engine.fusion import accumulate, collect_grams, state_to_tensors
from workers.engine.layers import create_attached
from workers.engine.loading import DEFAULT_MODEL, load_base_model
from workers.engine.store import FUSED_MAPS, FUSION_STATE, ModelStore
from workers.engine.unlearn import gram_batches

pytestmark = pytest.mark.slow

FORGET = [
    Example(text="Orla Fenwick's locker code at Brindle Gym is 4471."),
    Example(text="Orla Fenwick lives at 18 Quillon Terrace, Harrowgate, with her cat Pimsy."),
    Example(prompt="What is Orla Fenwick's badge number at Brindle Gym?", answer="Her badge number is 55821."),
    Example(prompt="Who is Orla Fenwick's physician?", answer="Dr. Tamsin Okafor at Harrowgate Clinic."),
]
TOP_K = 40  # guesses
EIGEN_K = 64  # directions of the stolen Gram
FIRST_MAP = "blocks.0.down"
PREFIX = "<|im_start|>user\nThe"  # in context, as the forget tokens were seen (position 0 is an attention sink)


@pytest.fixture(scope="module")
def base(models_dir):
    return load_base_model(DEFAULT_MODEL, models_dir, device="cpu")


def gram_of(base, examples) -> torch.Tensor:
    """The first map's Gram over `examples`, as fusion collects it (without the bias row/column)."""
    attached = create_attached(base.model, LayerConfig())
    try:
        grams = collect_grams(base.model, attached, gram_batches(base.tokenizer, examples, TrainConfig()))
    finally:
        attached.detach()
    return grams


def token_features(base) -> torch.Tensor:
    """x_v for every vocabulary id: block 0's feed-forward output at the token, after PREFIX. (V, d)"""
    block, captured = find_ffn_blocks(base.model)[0], []
    prefix = torch.tensor(base.tokenizer(PREFIX, add_special_tokens=False)["input_ids"])

    class Stop(Exception):
        pass

    def grab(_module, _args, output):
        captured.append(output[:, -1].detach().double())
        raise Stop

    handle = block.register_forward_hook(grab)
    try:
        with torch.no_grad():
            for start in range(0, base.model.config.vocab_size, 2048):
                ids = torch.arange(start, min(start + 2048, base.model.config.vocab_size)).unsqueeze(1)  # (B, 1)
                ids = torch.cat([prefix.repeat(ids.shape[0], 1), ids], dim=1)  # (B, P + 1)
                try:
                    base.model(input_ids=ids)
                except Stop:
                    pass
    finally:
        handle.remove()
    return torch.cat(captured)


def attack(stolen: torch.Tensor, features: torch.Tensor, special: set[int]) -> list[int]:
    """The TOP_K ordinary token ids whose features lie most in the stolen Gram's top eigen-directions."""
    d = features.shape[1]
    directions = torch.linalg.eigh(stolen[:d, :d]).eigenvectors[:, -EIGEN_K:]  # (d, k); bias row/column dropped
    score = ((features @ directions) ** 2).sum(1) / (features * features).sum(1)  # (V,)
    score[list(special)] = -1.0  # the attacker knows the special tokens are not the secret
    return score.topk(TOP_K).indices.tolist()


def rare_forget_tokens(base, background_text: str) -> set[int]:
    """Ids in the forget text that ordinary text does not use: the words that carry the private facts."""
    tok = base.tokenizer
    forget_ids = {i for e in FORGET for part in (e.text, e.prompt, e.answer) if part
                  for i in tok(part, add_special_tokens=False)["input_ids"]}
    return forget_ids - set(tok(background_text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def stolen_state(base):
    grams = gram_of(base, FORGET)
    state = accumulate(None, grams, {name: torch.zeros(g.shape[0], 1) for name, g in grams.items()}, "r-1")
    return {"state": state, "features": token_features(base)}


def test_the_raw_gram_matrix_gives_the_forget_text_away(base, stolen_state):
    special = set(base.tokenizer.all_special_ids) | set(base.tokenizer.added_tokens_decoder)
    guessed = attack(stolen_state["state"].gram_sum[FIRST_MAP], stolen_state["features"], special)
    ordinary = resources.files("workers.engine.resources").joinpath("general_text.txt").read_text()
    secret = rare_forget_tokens(base, ordinary)
    found = secret & set(guessed)
    words = sorted(base.tokenizer.decode([i]) for i in found)
    print(f"\nattack on the raw state: {len(found)} of {len(secret)} rare forget tokens in the top {TOP_K}: {words}")
    assert len(found) >= 10  # 10+ of 40 guesses from a 49k vocabulary: the state must not be stored in the clear


def test_the_state_a_version_stores_gives_the_attack_nothing(base, stolen_state, tmp_path):
    store = ModelStore(tmp_path / "store", sealer=fusion_state_sealer(tmp_path / "data"))  # as the worker writes
    tensors = state_to_tensors(stolen_state["state"])
    store.publish(1, {FUSED_MAPS: {"x": torch.zeros(1)}, FUSION_STATE: tensors}, {"request_ids": ["r-1"]})
    on_disk = (store.path(1) / f"{FUSION_STATE}.safetensors").read_bytes()
    gram_row = tensors[f"gram.{FIRST_MAP}"][0].numpy().tobytes()  # 577 float64s an attacker would look for
    assert gram_row not in on_disk and b"gram." not in on_disk  # no tensor, no header: ciphertext only
    assert json.loads((store.path(1) / "manifest.json").read_text())["sealed"] == [f"{FUSION_STATE}.safetensors"]
    assert not any(p.suffix == ".key" for p in store.root.rglob("*"))  # the key is not beside the state
    plain = ModelStore(tmp_path / "plain")  # control: the same bytes in the clear do contain the row
    plain.publish(1, {FUSED_MAPS: {"x": torch.zeros(1)}, FUSION_STATE: tensors}, {"request_ids": ["r-1"]})
    assert gram_row in (plain.path(1) / f"{FUSION_STATE}.safetensors").read_bytes()
