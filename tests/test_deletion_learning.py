"""Insertion corruption makes deletion learnable: a tiny model trained a few hundred steps flags
spurious tokens (which are ordinary tokens in its input) with <|delete|>, far above chance."""

import torch

from dgpt_core.config import DiffusionConfig, ModelConfig
from dgpt_core.diffusion.collator import DiffusionCollator
from dgpt_core.diffusion.loss import diffusion_loss
from dgpt_core.models.backbone import build_model, logits_at
from dgpt_core.models.tokenizer import non_special_token_ids, special_token_ids

from .conftest import structured_corpus


def _with_spurious(ids: list[int], at: int, token: int) -> list[int]:
    return ids[:at] + [token] + ids[at:]


def test_model_learns_to_flag_inserted_tokens_with_delete(tiny_tokenizer):
    tok = tiny_tokenizer
    special = special_token_ids(tok)
    texts = structured_corpus(360)
    rows = [tok.encode(t) + [special["eos"]] for t in texts]
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_seq_len=32), tok)
    cfg = DiffusionConfig(edit_start=0.0, edit_prob=0.1, insert_prob=0.1, seed=0)
    collator = DiffusionCollator.from_tokenizer(cfg, tok, 32)
    collator.set_progress(1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(300):
        picks = torch.randint(0, len(rows), (32,), generator=order).tolist()
        batch = collator([{"input_ids": rows[i]} for i in picks])
        loss = diffusion_loss(model, batch, mask_id=special["mask"]).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    ordinary = non_special_token_ids(tok)
    gen = torch.Generator().manual_seed(1)
    corrupted, spurious_at = [], []
    for ids in rows[:64]:
        at = int(torch.randint(1, len(ids), (1,), generator=gen))
        token = ids[at] if len(corrupted) % 2 else ordinary[int(torch.randint(len(ordinary), (1,), generator=gen))]
        corrupted.append(_with_spurious(ids, at, token))
        spurious_at.append(at)
    width = max(map(len, corrupted))
    input_ids = torch.full((len(corrupted), width), special["pad"])
    attention = torch.zeros_like(input_ids)
    for r, ids in enumerate(corrupted):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention[r, : len(ids)] = 1
    with torch.no_grad():
        every = attention.bool()
        predicted = logits_at(model, input_ids, attention, every).argmax(-1)
    is_spurious = torch.zeros_like(every)
    is_spurious[torch.arange(len(corrupted)), torch.tensor(spurious_at)] = True
    flagged = predicted == special["delete"]
    recall = flagged[is_spurious[every]].float().mean().item()
    false_flags = flagged[~is_spurious[every]].float().mean().item()
    chance = 1 / len(tok)
    assert recall >= 0.5 and recall > 50 * chance, recall
    assert false_flags < 0.05, false_flags
