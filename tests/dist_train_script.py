"""Tiny fakes for the training tests, and the script that tests/test_distributed.py runs under torchrun.

As a script: ``torchrun --standalone --nproc_per_node 2 tests/dist_train_script.py OUT`` trains two tiny
candidates for a few steps; every rank writes OUT/rank<r>.json with a hash of its final weights, its
validation curve and the rows it trained on; the main process also writes OUT/metrics.jsonl and saves
the models under OUT/models. Run with plain ``python`` it does the same in one process.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTForImageClassification

VOCAB = 64
SEQ = 16


class PatternData:
    """Fake TokenData: each row counts up by one (mod vocab) from a random start, so it is learnable.

    ``log`` holds, per iterator made by batches(), the row indices it yielded in order.
    """

    def __init__(self, rows: int = 64, seq: int = SEQ, seed: int = 0, pad: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (rows, 1), generator=gen)
        self.ids = (starts + torch.arange(seq)) % VOCAB  # (N, T)
        self.mask = torch.ones_like(self.ids)
        if pad:
            self.mask[:, -pad:] = 0  # right padding: no attention, no loss
        self.log: list[list[list[int]]] = []

    def batches(self, batch_size, *, shuffle=False, seed=0, epochs=1, drop_last=False):
        # Always drops a short last batch (the engine asks for drop_last=True when training).
        seen: list[list[int]] = []
        self.log.append(seen)
        return self._generate(batch_size, shuffle, seed, epochs, seen)

    def _generate(self, batch_size, shuffle, seed, epochs, seen):
        epoch, n = 0, self.ids.shape[0]
        if n < batch_size:
            return  # no full batch: nothing, rather than an endless loop (as TokenData does)
        while epochs is None or epoch < epochs:
            gen = torch.Generator().manual_seed(seed * 1000 + epoch)
            order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
            for start in range(0, n - batch_size + 1, batch_size):
                rows = order[start : start + batch_size]
                seen.append(rows.tolist())
                ids, mask = self.ids[rows], self.mask[rows]
                yield {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
            epoch += 1


class QuadrantImages(PatternData):
    """Fake ImageData: 1 x 8 x 8 noise with one bright quadrant; the label is the quadrant."""

    def __init__(self, rows: int = 64, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (rows,), generator=gen)
        self.pixels = 0.3 * torch.randn(rows, 1, 8, 8, generator=gen)
        for i, label in enumerate(self.labels.tolist()):
            r, c = divmod(label, 2)
            self.pixels[i, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.0
        self.ids = self.mask = self.labels  # _generate indexes these; _batch replaces the batch
        self.log = []

    def _generate(self, batch_size, shuffle, seed, epochs, seen):
        for _ in super()._generate(batch_size, shuffle, seed, epochs, seen):
            rows = torch.tensor(seen[-1])
            yield {"pixel_values": self.pixels[rows], "labels": self.labels[rows]}


def tiny_llama(seed: int = 0, dropout: float = 0.0) -> LlamaForCausalLM:
    """A 2-block Llama, hidden 32, vocab 64, float32."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, attention_dropout=dropout,
        bos_token_id=1, eos_token_id=2, pad_token_id=0))


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    """A 1-block ViT on 1 x 8 x 8 images, 4 classes."""
    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=8,
        patch_size=4, num_channels=1, num_labels=4))


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(out: Path) -> None:
    from subclone_core.training import Candidate, TrainConfig, train_candidates

    rank = int(os.environ.get("RANK", "0"))
    seen: dict[str, list] = {}
    candidates = [Candidate("subclone", tiny_llama(1)), Candidate("random", tiny_llama(2))]
    for cand in candidates:
        log = seen.setdefault(cand.name, [])
        cand.model.register_forward_pre_hook(
            lambda m, a, kw, log=log: log.append(kw["input_ids"].tolist()) if m.training else None,
            with_kwargs=True)
    config = TrainConfig(steps=8, batch_size=8, eval_every=4, eval_batches=2, warmup=0.25, seed=3)
    results = train_candidates(candidates, PatternData(seed=0), PatternData(rows=16, seed=9), config,
                               metrics_path=out / "metrics.jsonl", save_dir=out / "models")
    report = {
        "rank": rank,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "hash": {n: weights_hash(r.model) for n, r in results.items()},
        "evals": {n: r.curve("loss") for n, r in results.items()},
        "status": {n: r.status for n, r in results.items()},
        "seen": seen,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    if torch.distributed.is_initialized():
        # Leave together: a rank that exits while its peer still talks to it can abort in gloo's teardown.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
