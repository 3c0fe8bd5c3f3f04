"""Learn to reverse digit sequences with a GRU encoder-decoder and any attnzoo scoring rule.

The script makes its own data (random digit strings of mixed lengths, padded and masked), trains a
small encoder-decoder whose decoder attends over the encoder outputs with the rule named by
``--attention``, reports the token accuracy of greedy decoding on held-out length-10 sequences, and
saves a heat map of the decoder's attention for one of them. Reversal needs output step t to look at
input position L-1-t, so a working attention draws the anti-diagonal.

    python examples/seq2seq_reverse.py --attention additive --epochs 8 --out heatmap.png

Rules: ``concat`` (the seed's rule 1; its weights cannot depend on the decoder's query, see
`attnzoo.ConcatAttention`, so the decoder reverses from its own state and the map shows the
same row at every step), ``additive`` (rule 2, Bahdanau), ``dot`` (rule 3, scaled dot product),
``general`` (Luong), and ``location`` (the seed's ``Attn`` itself, batched: it scores input
*positions* from the decoder state and the previous token).

The heat map needs matplotlib (``pip install "attnzoo[plots]"``); ``--out ''`` skips it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import attnzoo

RULES = ("concat", "additive", "dot", "general", "location")
DIGITS, SOS, PAD = 10, 10, 11  # tokens 0-9 are digits; SOS starts decoding; PAD fills short inputs


@dataclass
class Config:
    """Everything that decides a run (the defaults reach >= 95% with every rule in a few minutes)."""

    attention: str = "dot"
    epochs: int = 5
    seed: int = 0
    train_size: int = 20_000
    test_size: int = 1_000
    min_len: int = 6
    max_len: int = 12
    test_len: int = 10
    batch_size: int = 64
    embed_dim: int = 32
    hidden: int = 64  # per encoder direction; the decoder and the attention work in 2 * hidden
    lr: float = 3e-3
    threads: int = 1  # the model is tiny: a second intra-op thread only adds synchronisation per op


@dataclass
class Result:
    accuracy: float  # token accuracy of greedy decoding on the held-out length-`test_len` sequences
    anti_diagonal: float  # mean attention weight on input position L-1-t at output step t
    seconds: float  # wall-clock training time
    cpu_seconds: float  # CPU time of this process while training (what a quiet machine's wall time is)
    example: Tensor  # one held-out input sequence, (test_len,)
    prediction: Tensor  # the model's greedy output for it, (test_len,)
    weights: Tensor  # the decoder's attention for it, (test_len, test_len): output step x input position


def make_data(cfg: Config, gen: torch.Generator) -> tuple[list[Tensor], Tensor]:
    """Training sequences of mixed lengths, and held-out length-`test_len` sequences none of them contain."""
    lengths = torch.randint(cfg.min_len, cfg.max_len + 1, (cfg.train_size,), generator=gen).tolist()
    train = [torch.randint(0, DIGITS, (n,), generator=gen) for n in lengths]
    seen = {tuple(s.tolist()) for s in train}
    test = [s for s in torch.randint(0, DIGITS, (2 * cfg.test_size, cfg.test_len), generator=gen)
            if tuple(s.tolist()) not in seen]
    return train, torch.stack(test[: cfg.test_size])


def pad(batch: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(B, S)`` tokens padded with PAD, and the ``(B, S)`` key padding mask (True = real token)."""
    lengths = torch.tensor([len(s) for s in batch])
    tokens = torch.full((len(batch), int(lengths.max())), PAD)
    for i, s in enumerate(batch):
        tokens[i, : len(s)] = s
    return tokens, torch.arange(tokens.shape[1])[None, :] < lengths[:, None]


class Seq2Seq(nn.Module):
    """Bidirectional GRU encoder; GRU decoder whose outputs query the encoder outputs (Luong style)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        if cfg.attention not in RULES:
            raise ValueError(f"attention must be one of {RULES}, got {cfg.attention!r}")
        e, h, d = cfg.embed_dim, cfg.hidden, 2 * cfg.hidden
        self.rule, self.max_len = cfg.attention, cfg.max_len
        self.embed = nn.Embedding(DIGITS + 2, e, padding_idx=PAD)
        self.encoder = nn.GRU(e, h, batch_first=True, bidirectional=True)
        self.bridge = nn.Linear(d, d)
        self.decoder = nn.GRU(e, d, batch_first=True)
        self.attention: nn.Module
        if self.rule == "location":  # the seed's Attn, batched; its attn_combine replaces `combine`
            self.attention = attnzoo.LocationAttention(d, e, cfg.max_len, d, d)
        else:
            self.attention = attnzoo.create(self.rule, d)  # queries and keys are both d wide
            self.combine = nn.Linear(2 * d, d)
        self.out = nn.Linear(d, DIGITS)

    def encode(self, src: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        lengths = mask.sum(1).cpu()
        packed = pack_padded_sequence(self.embed(src), lengths, batch_first=True, enforce_sorted=False)
        out, last = self.encoder(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])  # (B, S, 2h)
        state = torch.tanh(self.bridge(torch.cat([last[0], last[1]], dim=-1)))  # (B, 2h)
        return memory, state[None]  # (1, B, 2h): the decoder's initial hidden state

    def decode(
        self, prev: Tensor, state: Tensor, memory: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Logits ``(B, T, 10)``, attention ``(B, T, S)`` and the new state for previous tokens ``(B, T)``."""
        emb = self.embed(prev)  # (B, T, e)
        query, state = self.decoder(emb, state)  # (B, T, 2h)
        if self.rule == "location":
            width = self.max_len - memory.shape[1]  # pad positions up to max_len, masked
            if width < 0:
                raise ValueError(f"location attention scores max_len={self.max_len} positions, got an input "
                                 f"of length {memory.shape[1]}")
            memory = nn.functional.pad(memory, (0, 0, 0, width))  # (B, max_len, 2h)
            mask = nn.functional.pad(mask, (0, width))  # (B, max_len)
            hidden, weights = self.attention(query, emb, memory, mask, need_weights=True)
        else:
            context, weights = self.attention(query, memory, memory, mask, need_weights=True)
            hidden = self.combine(torch.cat([query, context], dim=-1))  # (B, T, 4h) -> (B, T, 2h)
        return self.out(torch.tanh(hidden)), weights, state

    def forward(self, src: Tensor, mask: Tensor, target: Tensor) -> Tensor:
        """Teacher-forced logits ``(B, T, 10)``: every decoder step in one attention call."""
        memory, state = self.encode(src, mask)
        prev = torch.cat([torch.full_like(target[:, :1], SOS), target[:, :-1]], dim=1)  # (B, T)
        return self.decode(prev, state, memory, mask)[0]

    @torch.no_grad()
    def greedy(self, src: Tensor, mask: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Greedy decoding: tokens ``(B, steps)`` and attention ``(B, steps, S)``."""
        memory, state = self.encode(src, mask)
        prev = torch.full((src.shape[0], 1), SOS)
        tokens, maps = [], []
        for _ in range(steps):
            logits, weights, state = self.decode(prev, state, memory, mask)
            prev = logits.argmax(-1)  # (B, 1)
            tokens.append(prev)
            maps.append(weights[:, :, : src.shape[1]])
        return torch.cat(tokens, 1), torch.cat(maps, 1)


def target_of(src: Tensor, mask: Tensor) -> Tensor:
    """Each sequence reversed within its own length (padding stays at the end)."""
    lengths = mask.sum(1, keepdim=True)
    index = (lengths - 1 - torch.arange(src.shape[1])[None, :]).clamp_min(0)  # (B, S)
    return torch.where(mask, src.gather(1, index), torch.full_like(src, PAD))


def run(cfg: Config, log: Callable[[str], None] | None = None) -> Result:
    """Train with ``cfg`` and evaluate on the held-out sequences; ``log`` gets one line per epoch."""
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train, test = make_data(cfg, gen)
    model = Seq2Seq(cfg)
    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        optim, cfg.lr, total_steps=cfg.epochs * -(-len(train) // cfg.batch_size)
    )
    loss_fn = nn.CrossEntropyLoss(ignore_index=PAD)
    start, cpu_start = time.perf_counter(), time.process_time()
    for epoch in range(cfg.epochs):
        model.train()
        total, count = 0.0, 0
        for batch in torch.randperm(len(train), generator=gen).split(cfg.batch_size):
            src, mask = pad([train[i] for i in batch.tolist()])
            target = target_of(src, mask)
            logits = model(src, mask, target)
            loss = loss_fn(logits.flatten(0, 1), target.flatten())
            optim.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            total, count = total + loss.item(), count + 1
        if log is not None:
            elapsed = time.perf_counter() - start
            log(f"epoch {epoch + 1}/{cfg.epochs}: loss {total / count:.4f} ({elapsed:.0f} s)")
    model.eval()
    mask = torch.ones_like(test, dtype=torch.bool)
    tokens, weights = model.greedy(test, mask, cfg.test_len)
    expected = test.flip(1)
    steps = torch.arange(cfg.test_len)
    return Result(
        accuracy=(tokens == expected).float().mean().item(),
        anti_diagonal=weights[:, steps, cfg.test_len - 1 - steps].mean().item(),
        seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - cpu_start,
        example=test[0],
        prediction=tokens[0],
        weights=weights[0],
    )


def save_heatmap(result: Result, path: str, title: str) -> None:
    """Save the attention map of one held-out sequence as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            'the attention heat map needs matplotlib: pip install "attnzoo[plots]" (or pass --out "")'
        ) from err
    digits = [str(d) for d in result.example.tolist()]
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    image = ax.imshow(result.weights.numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(digits)), digits)
    ax.set_yticks(range(len(digits)), [str(d) for d in result.prediction.tolist()])
    ax.set_xlabel("input digit (encoder position)")
    ax.set_ylabel("output digit (decoder step)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attention", choices=RULES, default="dot", help="scoring rule (default: dot)")
    parser.add_argument("--epochs", type=int, default=Config.epochs)
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--out", default="heatmap.png", help="PNG path of the attention map ('' to skip)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    cfg = Config(attention=args.attention, epochs=args.epochs, seed=args.seed)
    if args.out:  # fail before training, not after, when matplotlib is missing
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error('--out needs matplotlib: pip install "attnzoo[plots]" (or pass --out "")')
    result = run(cfg, log=print)
    print(f"attention={cfg.attention} epochs={cfg.epochs} seed={cfg.seed}: "
          f"token accuracy {result.accuracy:.2%} on {cfg.test_size} held-out "
          f"length-{cfg.test_len} sequences, "
          f"anti-diagonal weight {result.anti_diagonal:.2f}, trained in {result.seconds:.0f} s "
          f"({result.cpu_seconds:.0f} s CPU)")
    if args.out:
        save_heatmap(result, args.out, f"{cfg.attention} attention, accuracy {result.accuracy:.1%}")
        print(f"attention heat map saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
