"""Which training defaults win? A study of learning rate, warmup, decay, init and optimizer,
with PEFT's plain prompt-tuning loop as the reference, on several corpora and model families.

Every contestant trains a 20-token soft prompt with the same step as `softprompt train`
(softprompt.loss.block_loss on [soft][BOS][block], gradient clipping, an optimizer and a
LambdaLR schedule), on the same batches (one seed, so every contestant sees the same blocks
in the same order), and is scored by one evaluator: softprompt.loss.loss_sums (the loss that
`softprompt eval` reports) on a held-out passage, the last EVAL_TOKENS tokens of the corpus,
which no contestant trains on. A contestant is named by a spec string:

    OPTIMIZER:LR:SCHEDULE:INIT[:KEY=VALUE...]   e.g. adamw:0.1:w0-cos0:vocab, adafactor:0.3:const:vocab

- OPTIMIZER: adamw (weight decay 0, clip 1.0: softprompt's step), sf (schedule-free AdamW,
  Defazio et al. 2024, from the schedulefree package, softprompt's default: trained at its
  interpolated point, scored at its average; clip 1.0), adafactor (torch's Adafactor,
  relative steps: its step is lr x the soft prompt's RMS), muon (torch's Muon: momentum 0.95,
  Nesterov, the step orthogonalized by Newton-Schulz, its RMS 0.2 x lr as Moonshot's rule has
  it; clip 1.0), or peft: PEFT's plain loop as its docs write it, torch.optim.AdamW with its
  defaults (weight decay 0.01), no clipping, a constant learning rate.
- LR: a number, or rX: X times the RMS of the model's token embeddings (a rule that scales
  with the model).
- SCHEDULE: const, or wW-cosF / wW-linF: linear warmup over a fraction W of the steps, then
  cosine (or linear) decay to F x lr.
- INIT: vocab, text, random (softprompt's --init; text uses the corpus's line in CORPORA,
  the text a user would give), passage (the first 20 tokens of a training block), or
  peft-random / peft-text / peft-vocab: PEFT's own PromptTuningInit RANDOM (torch.nn.Embedding's
  N(0, 1) init), TEXT (the tokenized text, special tokens included, repeated) and
  SAMPLE_VOCAB, built by peft's PromptEmbedding itself. passageK: the best of K passages
  (the first drawn is passage's) by their loss on one batch (drawn with the seed + 1).
- KEY=VALUE (variations that lost, kept so the figures can be rerun). sf: r=X: the average
  weights step k by k^X (the library's r; 0, its default and softprompt's, is a plain
  average), b1=X: its beta1 (0.9: how far the gradient point leans to the average). adamw:
  res=M: a residual reparameterization, the prompt is P + MLP(P) with a shared d-M-d ReLU
  MLP whose output layer starts at zero (so the start is unchanged), trained with P, at
  mlr=X times the rate (default 1); avg=F: score the mean of the prompts over the last F of
  the steps; b2=X: AdamW's beta2; zca=P: train Z in P0 + Z (U diag(l / mean l)^(P/2) U^T)
  with U, l the eigenvectors and values of the token vectors' covariance (Adam's equal
  steps then follow the vocabulary's spread).

A contestant with a schedule trains once per step count; a constant-rate one trains once to
the largest and is scored at each. The step is softprompt's, with its kernel for the loss:
`check` shows that PEFT's own forward (get_peft_model, model(input_ids, labels)) trains
the same soft prompt. Results go to a JSONL file, one line per contestant and step count
scored, so a part can be stopped and resumed (done runs are skipped) and the table printed
from what exists.

    PYTHONPATH=. python bench/defaults_study.py run --model smollm2 --corpus austen --stage coarse
    PYTHONPATH=. python bench/defaults_study.py run --model gemma3 --corpus pydocs \\
        --contestants peft:0.03:const:peft-text adamw:r0.3:w0-cos0:vocab --steps 30 300
    PYTHONPATH=. python bench/defaults_study.py target      # 60 steps, 4 x 256, unseen corpus
    PYTHONPATH=. python bench/defaults_study.py table [--results FILE]
    PYTHONPATH=. python bench/defaults_study.py paired --corpus pydocs --steps 60 --dtype float32
    PYTHONPATH=. python bench/defaults_study.py check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "defaults_study.jsonl"
EVAL_TOKENS = 4096  # the held-out passage: the corpus's last 4,096 tokens
N_SOFT = 20
SEED = 1729
GEMMA = os.environ.get("GEMMA3_GGUF", "/tmp/bosmodel/gemma3/gemma-3-270m-q4_k_m.gguf")
MODELS = {"smollm2": None, "gemma3": GEMMA}


def shared_data() -> Path:
    """The project's shared corpora: ../shared/data from the project (or from a worktree of it)."""
    for up in (ROOT.parent, ROOT.parent.parent):
        if (up / "shared" / "data").is_dir():
            return up / "shared" / "data"
    return ROOT.parent / "shared" / "data"


# name: (file, kind, the text a user would give for --init text / PEFT's TEXT init)
CORPORA = {
    "austen": (
        "pride_and_prejudice.txt",
        "prose, 1813 (Austen, Pride and Prejudice; public domain)",
        "The following is a passage from a novel.",
    ),
    "shakespeare": (
        "shakespeare.txt",
        "plays: speakers' names, verse and dialogue (tiny Shakespeare; public domain)",
        "The following is a scene from a play.",
    ),
    "pydocs": (
        str(ROOT / "bench" / "data" / "python_docs.txt"),
        "modern technical prose (Python 3.11 tutorial, FAQ, HOWTOs; PSF License 2)",
        "The following is a passage from the Python documentation.",
    ),
}
TUNED_ON = ("austen", "shakespeare")  # the defaults were chosen on these; pydocs is unseen
EXTRAS = {  # a contestant's KEY=VALUE variations, by optimizer
    "adamw": ("res", "mlr", "avg", "b2", "zca"),
    "sf": ("r", "b1"),
}
DEFAULT_OPTIONS = ("optimizer", "lr", "warmup", "decay_to")  # what the study chose

# The staged search (what was run is in the README): the coarse grid at 30 and 100 steps on
# the two tuning corpora and both models, then the finalists at 30, 100 and 300 steps on all
# three corpora.
STAGES = {
    "coarse": [  # at 30 steps on SmolLM2 (lr absolute: its embeddings' RMS is 0.136)
        "peft:0.03:const:peft-text",
        "peft:0.03:const:peft-random",
        "adamw:0.03:w0.1-cos0.1:vocab",  # softprompt's defaults before this study
        "adamw:0.03:w0-cos0:vocab",
        "adamw:0.1:w0-cos0:vocab",
        "adamw:0.3:w0-cos0:vocab",
        "adamw:0.1:w0-cos0:text",
        "adamw:0.1:w0-cos0:passage",
        "adafactor:0.3:const:vocab",  # Lester et al.'s optimizer and rate
    ],
    "final": [  # at 30, 60, 100 and 300 steps on every corpus (300: SmolLM2 only)
        "peft:0.03:const:peft-text",
        "adamw:0.03:w0.1-cos0.1:vocab",  # softprompt's defaults before this study
        "adamw:0.03:w0.1-cos1:passage",  # warmup then constant, from a training passage
        "adamw:r0.22:w0.1-cos1:passage",  # the same at 0.22 x the embeddings' RMS
        "sf:0.03:w0.1-cos1:passage",  # the same with schedule-free AdamW: the defaults
        "sf:r0.22:w0.1-cos1:passage",
    ],
}


@dataclass(frozen=True)
class Contestant:
    spec: str
    optimizer: str
    lr: float | None  # absolute, or None when relative
    lr_rel: float | None  # x the embeddings' RMS
    warmup: float
    decay: str  # const, cos, lin
    floor: float
    init: str
    extra: dict = field(default_factory=dict)  # the KEY=VALUE variations

    @classmethod
    def parse(cls, spec: str) -> Contestant:
        try:
            opt, lr, sched, init, *more = spec.split(":")
            extra = tuple((k, float(v)) for k, v in (x.split("=") for x in more))
        except ValueError:
            raise SystemExit(
                f"contestant {spec!r}: want OPTIMIZER:LR:SCHEDULE:INIT[:KEY=VALUE...]"
            ) from None
        if opt not in ("adamw", "adafactor", "muon", "sf", "peft"):
            raise SystemExit(
                f"contestant {spec!r}: optimizer must be adamw, adafactor, muon, sf or peft"
            )
        if any(k not in EXTRAS.get(opt, ()) for k, _ in extra):
            keys = "; ".join(f"{o}: {', '.join(ks)}" for o, ks in EXTRAS.items())
            raise SystemExit(f"contestant {spec!r}: the keys are {keys}")
        rel = lr.startswith("r")
        value = float(lr[1:] if rel else lr)
        if sched == "const":
            warmup, decay, floor = 0.0, "const", 1.0
        else:
            m = re.fullmatch(r"w([\d.]+)-(cos|lin)([\d.]+)", sched)
            if not m:
                raise SystemExit(
                    f"contestant {spec!r}: schedule must be const or wW-cosF / wW-linF"
                )
            warmup, decay, floor = float(m[1]), m[2], float(m[3])
        if opt == "peft" and sched != "const":
            raise SystemExit(f"contestant {spec!r}: PEFT's plain loop has a constant rate")
        inits = ("vocab", "text", "random", "passage", "peft-random", "peft-text", "peft-vocab")
        if init not in inits and not re.fullmatch(r"passage\d+", init):
            raise SystemExit(f"contestant {spec!r}: init must be one of {', '.join(inits)}")
        return cls(
            spec,
            opt,
            None if rel else value,
            value if rel else None,
            warmup,
            decay,
            floor,
            init,
            dict(extra),
        )

    @property
    def length_free(self) -> bool:
        """Its rate does not depend on the run's length: one run gives every step count."""
        return self.decay == "const" and self.warmup == 0


def schedule(total: int, warmup: float, decay: str, floor: float):
    """Linear warmup over ``warmup`` of the steps, then cosine or linear decay to floor x lr
    (softprompt's lr_schedule with warmup 0.1, cos, floor 0.1 before this study)."""
    warm = int(round(total * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if decay == "const":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cos" else 1.0 - progress
        return floor + (1.0 - floor) * shape

    return factor


# ----------------------------------------------------------------------------- the pieces


@dataclass
class Setup:
    lm: object
    model_name: str
    corpus: str
    block_size: int
    batch_size: int
    train_blocks: object
    heldout: object
    lead: object
    emb_rms: float


def load(model: str):
    import softprompt

    return softprompt.load_model(MODELS[model], "cpu", "auto")


def corpus_path(name: str) -> Path:
    file = CORPORA[name][0]
    return Path(file) if os.path.isabs(file) else shared_data() / file


def make_setup(lm, model_name: str, corpus: str, block_size: int, batch_size: int) -> Setup:
    """The corpus as one token stream: its last EVAL_TOKENS tokens are the held-out passage
    (cut into blocks), the blocks before them the training data."""
    import numpy as np
    import torch

    from softprompt.data import make_blocks, read_dataset, tokenize_dataset

    ids = tokenize_dataset(read_dataset(corpus_path(corpus)), lm.tokenizer).ids[0].astype(np.int64)
    heldout = torch.from_numpy(ids[-EVAL_TOKENS:].reshape(-1, block_size).copy())
    train_blocks = make_blocks(ids[:-EVAL_TOKENS], block_size)
    lead = torch.tensor(lm.bos_ids, dtype=torch.long) if lm.bos_ids else None
    emb_rms = token_vectors(lm).pow(2).mean().sqrt().item()
    return Setup(
        lm, model_name, corpus, block_size, batch_size, train_blocks, heldout, lead, emb_rms
    )


def token_vectors(lm):
    """The token vectors that ``--lr auto`` measures (softprompt's token_sample: 4,096 ids
    drawn with seed 0): their RMS scales the relative rates, their covariance zca's map."""
    import torch

    from softprompt.soft_prompt import token_sample

    with torch.no_grad():
        return token_sample(lm.model, lm.tokenizer)


def initial(s: Setup, c: Contestant, seed: int):
    """The contestant's starting soft prompt, float32 (N_SOFT, d)."""
    import torch

    from softprompt.soft_prompt import init_tensor

    text = CORPORA[s.corpus][2]
    if c.init.startswith("passage"):  # passage, or passageK: the best of K
        k = int(c.init[len("passage") :] or 1)
        return passages(s, 1, seed)[0] if k == 1 else best_passage(s, k, seed)
    if not c.init.startswith("peft-"):
        return init_tensor(s.lm.model, s.lm.tokenizer, c.init, N_SOFT, text, seed)
    from peft import PromptTuningConfig, PromptTuningInit, TaskType
    from peft.tuners.prompt_tuning.model import PromptEmbedding

    from softprompt.model import find_model

    kind = {"peft-random": "RANDOM", "peft-text": "TEXT", "peft-vocab": "SAMPLE_VOCAB"}[c.init]
    cfg = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=N_SOFT,
        token_dim=s.lm.embed_dim,
        num_transformer_submodules=1,
        prompt_tuning_init=PromptTuningInit[kind],
        prompt_tuning_init_text=text if kind == "TEXT" else None,
        # the tokenizer softprompt loaded (saved beside its dense copy of a .gguf)
        tokenizer_name_or_path=find_model(MODELS[s.model_name], s.lm.dtype).folder,
    )
    torch.manual_seed(seed)
    return (
        PromptEmbedding(cfg, s.lm.model.get_input_embeddings())
        .embedding.weight.detach()
        .float()
        .clone()
    )


def passages(s: Setup, k: int, seed: int) -> list:
    """The vectors of the first N_SOFT tokens of ``k`` training blocks drawn by ``seed``."""
    import numpy as np
    import torch

    from softprompt.soft_prompt import embed_ids

    rng = np.random.default_rng(seed)
    blocks = [s.train_blocks[rng.integers(len(s.train_blocks))] for _ in range(k)]
    return [embed_ids(s.lm.model, torch.from_numpy(b[:N_SOFT].copy())) for b in blocks]


def best_passage(s: Setup, k: int, seed: int):
    """Of ``k`` passages (the first is ``passage``'s), the one whose vectors give the lowest
    loss on a batch drawn with ``seed + 1``."""
    import torch

    from softprompt.data import BatchSampler

    candidates = passages(s, k, seed)
    probe = BatchSampler(s.train_blocks, s.batch_size, seed + 1, torch.device("cpu")).batch(0)
    with torch.no_grad():
        losses = batched_losses(s.lm, candidates, probe, s.lead).mean(1).tolist()
    print("  passages' losses: " + " ".join(f"{x:.3f}" for x in losses), flush=True)
    return candidates[min(range(k), key=losses.__getitem__)]


def optimizer_for(c: Contestant, soft, emb_rms: float, net=None):
    import torch

    lr = c.lr if c.lr is not None else c.lr_rel * emb_rms
    if c.optimizer == "peft":
        return torch.optim.AdamW([soft], lr=lr)  # torch's defaults: weight decay 0.01
    if c.optimizer == "adamw":
        groups = [{"params": [soft]}]
        if net is not None:
            groups.append({"params": list(net.parameters()), "lr": lr * c.extra.get("mlr", 1.0)})
        betas = (0.9, c.extra.get("b2", 0.999))
        return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, betas=betas)
    if c.optimizer == "muon":  # the step's RMS matched to AdamW's: 0.2 x lr x sqrt(d)
        return torch.optim.Muon([soft], lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    if c.optimizer == "sf":  # the warmup is the schedule's: its weights follow the rate
        import schedulefree

        opt = schedulefree.AdamWScheduleFree(
            [soft],
            lr=lr,
            weight_decay=0.0,
            betas=(c.extra.get("b1", 0.9), 0.999),
            r=c.extra.get("r", 0.0),
        )
        opt.train()
        return opt
    return torch.optim.Adafactor([soft], lr=lr, weight_decay=0.0)


def batched_losses(lm, softs: list, block, lead):
    """Per-token losses (K, B x keep) of ``block`` (B, T) under each of K soft prompts: the
    loss of softprompt.loss.block_loss for each, computed in one forward pass of K x B
    sequences (the frozen model treats the rows independently, so each soft prompt's gradient
    is its own). Running the contestants side by side gets far more out of a shared CPU."""
    import torch

    from softprompt.loss import cross_entropy, fused_head, head_cross_entropy
    from softprompt.soft_prompt import block_inputs, lead_length, n_predicted

    model = lm.model
    ids = block_inputs(block, lead)  # (B, k + T - 1)
    tok = model.get_input_embeddings()(ids)
    K, (B, L, d), n = len(softs), tok.shape, softs[0].shape[0]
    prefix = torch.stack([x.to(tok.dtype) for x in softs])  # (K, n, d)
    embeds = torch.cat(
        [prefix[:, None].expand(K, B, n, d), tok[None].expand(K, B, L, d)], dim=2
    ).reshape(K * B, n + L, d)
    keep = n_predicted(n + lead_length(lead), block.shape[1])
    labels = block[:, block.shape[1] - keep :].reshape(-1).repeat(K)
    head = fused_head(model)
    if head is not None:
        hidden = model.base_model(inputs_embeds=embeds, use_cache=False)[0]
        hidden = hidden[:, -keep:].reshape(-1, d)
        losses = head_cross_entropy(hidden, head.weight, head.bias, labels)
    else:
        logits = model(inputs_embeds=embeds, use_cache=False).logits[:, -keep:]
        losses = cross_entropy(logits.reshape(-1, logits.shape[-1]), labels)
    return losses.view(K, -1)


def heldout_losses(s: Setup, softs: list, chunk: int = 4) -> list[float]:
    """Mean loss per token of the held-out passage under each soft prompt: the evaluation
    every contestant gets (softprompt.loss.loss_sums' figure, checked by ``check``)."""
    import torch

    totals = torch.zeros(len(softs), dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(s.heldout), chunk):
            losses = batched_losses(
                s.lm, [x.detach() for x in softs], s.heldout[i : i + chunk], s.lead
            )
            totals += losses.double().sum(1)
    count = len(s.heldout) * s.heldout.shape[1]
    return (totals / count).tolist()


@dataclass
class Track:
    """One contestant trained for ``total`` steps, scored after each of ``score_at``."""

    c: Contestant
    total: int
    score_at: list
    soft: object = None  # the trained tensor: the prompt, or Z with zca
    opt: object = None
    sched: object = None
    step: int = 0
    losses: list = None
    dead: bool = False
    net: object = None  # res: the residual MLP
    zca: tuple = None  # zca: (P0, the d x d map)
    avg: object = None  # avg: the sum of the prompts so far, and how many
    n_avg: int = 0

    def start(self, s: Setup, seed: int) -> None:
        import torch

        init = initial(s, self.c, seed)
        if "zca" in self.c.extra:  # trains Z from zero; the prompt is init + Z x the map
            self.zca = (init, embedding_map(s, self.c.extra["zca"]))
        self.soft = torch.nn.Parameter(init if self.zca is None else torch.zeros_like(init))
        if "res" in self.c.extra:
            torch.manual_seed(seed)
            d, m = init.shape[1], int(self.c.extra["res"])
            self.net = torch.nn.Sequential(
                torch.nn.Linear(d, m), torch.nn.ReLU(), torch.nn.Linear(m, d)
            )
            torch.nn.init.zeros_(self.net[2].weight)
            torch.nn.init.zeros_(self.net[2].bias)
        self.opt = optimizer_for(self.c, self.soft, s.emb_rms, self.net)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, schedule(self.total, self.c.warmup, self.c.decay, self.c.floor)
        )
        self.losses = []

    def params(self) -> list:
        return [self.soft, *(self.net.parameters() if self.net is not None else ())]

    def prompt(self):
        """The soft prompt the model sees now."""
        x = self.soft if self.zca is None else self.zca[0] + self.soft @ self.zca[1]
        return x if self.net is None else x + self.net(x)

    def stepped(self) -> None:
        """After an optimizer step: add the prompt to the mean when ``avg`` says so."""
        if self.step > (1 - self.c.extra.get("avg", 0.0)) * self.total:
            p = self.prompt().detach().clone()  # not a view of the trained tensor
            self.avg = p if self.avg is None else self.avg + p
            self.n_avg += 1

    def scored(self):
        """The soft prompt the evaluator scores: the mean with ``avg``, else the current one."""
        if self.c.optimizer == "sf":  # scored at the averaged point x, trained at y
            self.opt.eval()
            p = self.prompt().detach().clone()
            self.opt.train()
            return p
        return self.avg / self.n_avg if self.n_avg else self.prompt().detach()


def embedding_map(s: Setup, power: float):
    """U diag(l / mean l)^(power / 2) U^T from the covariance of token_vectors (U, l: its
    eigenvectors and values)."""
    import torch

    lam, u = torch.linalg.eigh(torch.cov(token_vectors(s.lm).T))
    lam = lam.clamp_min(1e-12)
    return (u * (lam / lam.mean()).pow(0.5 * power)) @ u.T


def train_tracks(s: Setup, tracks: list[Track], seed: int, record, group: int) -> None:
    """Train the tracks side by side on the same batches (``group`` contestants per forward
    pass at most), each with its own optimizer, schedule and clipping: softprompt's step."""
    import torch

    from softprompt.data import BatchSampler

    for t in tracks:
        t.start(s, seed)
    batches = BatchSampler(s.train_blocks, s.batch_size, seed, torch.device("cpu"))
    t0, step = time.perf_counter(), 0
    while active := [t for t in tracks if t.step < t.total and not t.dead]:
        batch = batches.batch(step * s.batch_size)
        step += 1
        for i in range(0, len(active), group):
            part = active[i : i + group]
            losses = batched_losses(s.lm, [t.prompt() for t in part], batch, s.lead).mean(1)
            losses.sum().backward()
            for t, loss in zip(part, losses.tolist(), strict=True):
                t.losses.append(loss)
        for t in active:
            if t.c.optimizer != "peft":  # softprompt clips at 1.0; PEFT's plain loop does not
                torch.nn.utils.clip_grad_norm_(t.params(), 1.0)
            t.opt.step()
            t.sched.step()
            t.opt.zero_grad(set_to_none=True)
            t.step += 1
            t.stepped()
            t.dead = not (math.isfinite(t.losses[-1]) and bool(torch.isfinite(t.soft).all()))
        if step % 10 == 0:
            print(
                f"  step {step}: {len(active)} runs, {time.perf_counter() - t0:.0f} s", flush=True
            )
        due = [t for t in active if t.step in t.score_at or t.dead]
        if due:
            scoring = time.perf_counter()
            live = [t for t in due if not t.dead]
            held = (
                dict(zip(map(id, live), heldout_losses(s, [t.scored() for t in live]), strict=True))
                if live
                else {}
            )
            for t in due:
                train = sum(t.losses[-10:]) / len(t.losses[-10:])
                record(t.c, t.total, t.step, held.get(id(t), math.nan), train, scoring - t0)
            t0 += time.perf_counter() - scoring  # the scoring is not training time


# ----------------------------------------------------------------------------- results


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def dtype_of(r: dict) -> str:
    """The dtype a result was computed in. Rows without one came from machines whose CPUs have
    fast bfloat16 (AMX or AVX512-BF16), where softprompt's "auto" picks it."""
    return r.get("dtype", "bfloat16")


def dtype_name(lm) -> str:
    """The model's dtype as a result row names it: float32, bfloat16."""
    return str(lm.dtype).removeprefix("torch.")


def write_row(
    args,
    s: Setup,
    dtype: str,
    seed: int,
    spec: str,
    run_steps: int,
    at: int,
    held: float,
    train: float,
    secs: float,
) -> None:
    """One result appended to ``args.results``: ``spec`` trained ``run_steps`` steps, scored
    after ``at``."""
    import torch

    r = {
        "model": args.model, "corpus": args.corpus, "block": args.block_size,
        "batch": args.batch_size, "seed": seed, "contestant": spec,
        "run_steps": run_steps, "at": at, "heldout_loss": held, "train_loss": train,
        "train_s": round(secs, 1), "torch": torch.__version__, "emb_rms": s.emb_rms,
        "dtype": dtype,
    }  # fmt: skip
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as fh:
        fh.write(json.dumps(r) + "\n")


def key(r: dict) -> tuple:
    return (
        dtype_of(r),
        r["model"],
        r["corpus"],
        r["block"],
        r["batch"],
        r["seed"],
        r["contestant"],
        r["run_steps"],
        r["at"],
    )


def cmd_run(args) -> None:
    contestants = [Contestant.parse(x) for x in (args.contestants or STAGES[args.stage])]
    done = {key(r) for r in read_results(args.results)}
    lm = load(args.model)
    dtype = dtype_name(lm)
    s = make_setup(lm, args.model, args.corpus, args.block_size, args.batch_size)
    print(
        f"{args.model} ({lm.dtype}), {args.corpus}: {len(s.train_blocks)} training blocks of "
        f"{args.block_size}, held-out {len(s.heldout)} blocks; embeddings' RMS {s.emb_rms:.4f}",
        flush=True,
    )

    def record(c: Contestant, run_steps: int, at: int, held: float, train: float, secs: float):
        write_row(args, s, dtype, args.seed, c.spec, run_steps, at, held, train, secs)
        print(
            f"  {c.spec:32} {at:4d}/{run_steps:<4d} held-out {held:.4f}  train {train:.4f}  {secs:6.0f} s",
            flush=True,
        )

    steps = sorted(args.steps)
    tracks = []  # a length-free contestant trains once to the most steps, scored on the way
    for c in contestants:
        wanted = [(max(steps), steps)] if c.length_free else [(n, [n]) for n in steps]
        for total, score_at in wanted:
            run = {
                "dtype": dtype, "model": args.model, "corpus": args.corpus,
                "block": args.block_size, "batch": args.batch_size, "seed": args.seed,
                "contestant": c.spec, "run_steps": total,
            }  # fmt: skip
            if any(key({**run, "at": n}) not in done for n in score_at):
                tracks.append(Track(c, total, score_at))
    print(
        f"{len(tracks)} runs to make: {', '.join(f'{t.c.spec}@{t.total}' for t in tracks)}",
        flush=True,
    )
    if tracks:
        train_tracks(s, tracks, args.seed, record, args.group)


# ----------------------------------------------------------------------------- the table


def by_seed(
    results: list[dict], spec: str, model: str, corpus: str, steps: int, block: int
) -> dict[int, float]:
    """The held-out loss of ``spec`` after ``steps`` steps, by seed (a constant-rate
    contestant's longer run counts: its first ``steps`` are the same run)."""
    return {
        r["seed"]: r["heldout_loss"] for r in results
        if r["contestant"] == spec and r["model"] == model and r["corpus"] == corpus
        and r["at"] == steps and r["block"] == block
        and (r["run_steps"] == steps or Contestant.parse(spec).length_free)
    }  # fmt: skip


def cell(
    results: list[dict], spec: str, model: str, corpus: str, steps: int, block: int
) -> float | None:
    """The held-out loss of ``spec`` after ``steps`` steps (mean over seeds), or None."""
    vals = list(by_seed(results, spec, model, corpus, steps, block).values())
    return sum(vals) / len(vals) if vals else None


def cmd_table(args) -> None:
    results = [
        r for r in read_results(args.results)
        if r["block"] == args.block_size and dtype_of(r) == args.dtype
        and (not args.seeds or r["seed"] in args.seeds)
    ]  # fmt: skip
    if not results:
        print(f"no results in {args.results} for block {args.block_size} in {args.dtype}")
        return
    cols = sorted(
        {(r["model"], r["corpus"], r["at"]) for r in results},
        key=lambda k: (list(MODELS).index(k[0]), list(CORPORA).index(k[1]), k[2]),
    )
    cols = [k for k in cols if k[2] in args.steps]
    specs = list(dict.fromkeys(r["contestant"] for r in results))
    ref = args.reference
    width = 7
    print(
        f"held-out loss (nats/token), block {args.block_size}, {args.dtype}; rows: contestants; columns: model/corpus/steps"
    )
    heads = [f"{m[:5]}/{c[:5]}/{n}" for m, c, n in cols]
    print(
        f"{'contestant':32} "
        + " ".join(f"{h:>{max(width, len(h))}}" for h in heads)
        + f" {'mean d':>7} {'worst d':>7}"
    )
    refs = [cell(results, ref, m, c, n, args.block_size) for m, c, n in cols]
    rows = []
    for spec in specs:
        vals = [cell(results, spec, m, c, n, args.block_size) for m, c, n in cols]
        deltas = [v - r for v, r in zip(vals, refs, strict=True) if v is not None and r is not None]
        mean_d = sum(deltas) / len(deltas) if deltas else math.nan
        worst = max(deltas) if deltas else math.nan
        rows.append((spec, vals, mean_d, worst, len(deltas)))
        line = " ".join(
            f"{'-' if v is None else f'{v:.3f}':>{max(width, len(h))}}"
            for v, h in zip(vals, heads, strict=True)
        )
        print(f"{spec:32} {line} {mean_d:+7.3f} {worst:+7.3f}")
    print(
        f"(d: held-out loss minus {ref}'s in the same column, mean and worst over the columns both have)"
    )
    from softprompt.config import FIELDS

    print(
        "softprompt's defaults: "
        + ", ".join(f"--{n.replace('_', '-')} {FIELDS[n].default}" for n in DEFAULT_OPTIONS)
        + " (passage, unless --init-text is given)"
    )
    for model in dict.fromkeys(m for m, _, _ in cols):  # rates differ by model: one pick each
        picks = []
        for spec, vals, *_ in rows:
            d = [
                v - r for v, r, (m, _, _) in zip(vals, refs, cols, strict=True)
                if m == model and v is not None and r is not None
            ]  # fmt: skip
            if d and spec != ref:
                picks.append((len(d), -sum(d) / len(d), spec, max(d)))
        if picks:
            n, mean_d, spec, worst = max(picks)
            print(
                f"{model}: best over the most columns ({n}): {spec}  (mean {-mean_d:+.3f}, "
                f"worst {worst:+.3f} nats against {ref})"
            )


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t975(df: int) -> float:
    """Student's t at 0.975 (a two-sided 95% interval) for ``df`` degrees of freedom: the
    table to 10, then its Cornish-Fisher expansion (within 0.003 of the table from 11)."""
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def cmd_paired(args) -> None:
    """Each contestant against the reference seed by seed in one column (model, corpus,
    steps): the mean difference over the seeds both have, with its 95% interval. One run's
    held-out loss moves by about 0.01 with the seed (the blocks and their order), so a
    margin is a claim about this mean, not about one run."""
    import statistics

    results = results_in(args, args.dtype)
    col = (args.model, args.corpus, args.steps, args.block_size)
    ref = by_seed(results, args.reference, *col)
    specs = args.contestants or [
        x for x in dict.fromkeys(r["contestant"] for r in results) if x != args.reference
    ]
    print(
        f"{args.model}, {args.corpus}, {args.steps} steps of {args.batch_size} x "
        f"{args.block_size}, {args.dtype}: held-out loss minus {args.reference}'s, seed by seed"
    )
    shown = 0
    for spec in specs:
        mine = by_seed(results, spec, *col)
        seeds = sorted(set(mine) & set(ref))
        if len(seeds) < max(1, args.min_seeds):  # none in common: nothing to compare
            continue
        shown += 1
        d = [mine[x] - ref[x] for x in seeds]
        mean = statistics.fmean(d)
        print(f"{spec}:")
        for x, v in zip(seeds, d, strict=True):
            print(f"  seed {x:5d}  {ref[x]:.4f} -> {mine[x]:.4f}  {v:+.4f}")
        if len(d) < 2:
            print(f"  one seed: {mean:+.4f}, no interval")
            continue
        sd = statistics.stdev(d)
        se = sd / math.sqrt(len(d))
        lo, hi = mean - t975(len(d) - 1) * se, mean + t975(len(d) - 1) * se
        print(
            f"  {len(d)} seeds: mean {mean:+.4f}, sd {sd:.4f}, standard error "
            f"{se:.4f}, 95% interval [{lo:+.4f}, {hi:+.4f}]"
        )
    if not shown:
        print(f"  no contestant has {args.min_seeds} or more seeds in common with the reference")


# ----------------------------------------------------------------------------- the target


def cmd_target(args) -> None:
    """`softprompt train` with its defaults (softprompt.train, as the CLI calls it) against
    PEFT's plain loop from text init: the same steps, batch, block and soft tokens on the
    unseen corpus, both scored by this study's evaluator on its held-out passage."""
    import numpy as np

    lm = load(args.model)
    dtype = dtype_name(lm)
    s = make_setup(lm, args.model, args.corpus, args.block_size, args.batch_size)
    spec = f"train:{args.lr}"
    done = by_seed(
        results_in(args, dtype), spec, args.model, args.corpus, args.steps, args.block_size
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"{args.corpus}.txt"
        # the training part of the corpus, as a user would give it (softprompt holds out its
        # own validation blocks from it); the held-out passage stays unseen
        data.write_text(
            lm.tokenizer.decode(np.concatenate(list(s.train_blocks)).tolist()), encoding="utf-8"
        )
        for seed in args.seeds:
            if seed in done:  # run before: its row is in the results
                mine, how = done[seed], "in the results"
            else:
                mine, how = train_defaults(args, s, dtype, seed, spec, data)
            peft = peft_loss(args, s, dtype, seed)
            rows.append(mine - peft)
            print(
                f"seed {seed}: softprompt's defaults ({how}) {mine:.4f}; PEFT's plain loop, "
                f"text init {peft:.4f}; difference {mine - peft:+.4f}",
                flush=True,
            )
    print(
        f"mean difference over {len(rows)} seed(s), {dtype}: {sum(rows) / len(rows):+.4f} nats "
        f"(target: -0.02 or lower; `paired --dtype {dtype}` gives its interval over every seed run)"
    )


def train_defaults(args, s: Setup, dtype: str, seed: int, spec: str, data: Path) -> tuple:
    """`softprompt train` on ``data`` with ``seed``, scored and recorded: (held-out loss, what
    it ran with)."""
    import softprompt

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        r = softprompt.train(
            dataset=str(data), output=out + "/run", model=s.lm, max_steps=args.steps,
            batch_size=args.batch_size, block_size=args.block_size, seed=seed, lr=args.lr,
            progress=False, report=False, save_every=0,
        )  # fmt: skip
        secs = time.perf_counter() - t0
    mine = heldout_losses(s, [r.soft_prompt.tensor.float()])[0]
    losses = [m["loss"] for m in r.metrics if "loss" in m][-10:]
    train = sum(losses) / len(losses) if losses else math.nan
    write_row(args, s, dtype, seed, spec, args.steps, args.steps, mine, train, secs)
    return mine, (
        f"lr {r.config.lr:g}, warmup {r.config.warmup:g}, init {r.config.init}, {args.steps} "
        f"steps of {args.batch_size} x {args.block_size}, {secs:.0f} s"
    )


def results_in(args, dtype: str) -> list[dict]:
    """The results in ``dtype`` with ``args``' batch size."""
    return [
        r for r in read_results(args.results)
        if dtype_of(r) == dtype and r["batch"] == args.batch_size
    ]  # fmt: skip


def peft_loss(args, s: Setup, dtype: str, seed: int) -> float:
    """PEFT's loop from text after ``args.steps`` steps with ``seed``: from the results when
    they have it, else trained (and recorded)."""
    spec = "peft:0.03:const:peft-text"
    done = by_seed(
        results_in(args, dtype), spec, args.model, args.corpus, args.steps, args.block_size
    )
    if seed in done:
        return done[seed]
    got: dict = {}

    def record(c, run_steps, at, held, train, secs) -> None:
        write_row(args, s, dtype, seed, c.spec, run_steps, at, held, train, secs)
        got["h"] = held

    train_tracks(s, [Track(Contestant.parse(spec), args.steps, [args.steps])], seed, record, 1)
    return got["h"]


# ----------------------------------------------------------------------------- checks


def cmd_check(args) -> None:
    """That the study measures what softprompt and PEFT do: (1) side-by-side contestants get
    block_loss's gradients, (2) the evaluator gives loss_sums' figure, (3) PEFT's own model
    and forward (get_peft_model, model(input_ids, labels)) train the same soft prompt as this
    study's PEFT loop. On SmolLM2 (no BOS: PEFT's labels are then exactly the block's)."""
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    from softprompt.data import BatchSampler
    from softprompt.loss import block_loss, loss_sums

    lm = load("smollm2")
    s = make_setup(lm, "smollm2", "austen", 64, 2)
    softs = [
        torch.nn.Parameter(initial(s, Contestant.parse(f"adamw:0.1:const:{i}"), SEED))
        for i in ("vocab", "text")
    ]
    batch = torch.from_numpy(s.train_blocks[:2].copy())
    batched_losses(lm, softs, batch, s.lead).mean(1).sum().backward()
    for soft in softs:
        alone = soft.detach().clone().requires_grad_()
        block_loss(lm.model, alone, batch).backward()
        print(
            f"(1) gradient side by side vs alone: max |difference| {(soft.grad - alone.grad).abs().max():.2e} (norm {alone.grad.norm():.3f})"
        )
    mine = heldout_losses(s, softs)
    for soft, m in zip(softs, mine, strict=True):
        total, count = loss_sums(lm.model, soft.detach(), s.heldout, 4, "cpu")
        print(f"(2) held-out loss here {m:.5f}, softprompt.loss.loss_sums {total / count:.5f}")
    init = initial(s, Contestant.parse("peft:0.03:const:peft-random"), SEED)
    soft = torch.nn.Parameter(init.clone())
    opt = torch.optim.AdamW([soft], lr=0.03)
    batches = BatchSampler(s.train_blocks, 2, SEED, torch.device("cpu"))
    here = []
    for step in range(args.steps):
        loss = block_loss(lm.model, soft, batches.batch(step * 2))
        loss.backward()
        opt.step()
        opt.zero_grad()
        here.append(loss.item())
    model = get_peft_model(
        lm.model,
        PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=N_SOFT,
            prompt_tuning_init=PromptTuningInit.RANDOM,
        ),
    )
    emb = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        emb.copy_(init)
    opt = torch.optim.AdamW([emb], lr=0.03)
    for step in range(args.steps):
        b = batches.batch(step * 2)
        loss = model(input_ids=b, labels=b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(
            f"(3) step {step + 1}: loss here {here[step]:.4f}, with PEFT's forward {loss.item():.4f}"
        )
    diff = (emb.detach().float() - soft.detach()).abs().max().item()
    print(
        f"(3) after {args.steps} steps: max |difference| of the soft prompts {diff:.2e} (init RMS {init.pow(2).mean().sqrt():.3f})"
    )


def main() -> None:
    from softprompt.config import DTYPES, read_value

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="train contestants on one model and corpus")
    run.add_argument("--model", choices=list(MODELS), default="smollm2")
    run.add_argument("--corpus", choices=list(CORPORA), default="austen")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--stage", choices=list(STAGES), default="coarse")
    group.add_argument("--contestants", nargs="+")
    run.add_argument("--steps", type=int, nargs="+", default=[30, 100])
    run.add_argument("--group", type=int, default=12, help="contestants per forward pass at most")
    table = sub.add_parser("table", help="print the table from the results")
    table.add_argument("--steps", type=int, nargs="+", default=[30, 60, 100, 300])
    table.add_argument(
        "--seeds", type=int, nargs="+", help="only these seeds (default: a cell is the mean of all)"
    )
    target = sub.add_parser("target", help="the issue's 60-step target on the unseen corpus")
    target.add_argument("--model", choices=list(MODELS), default="smollm2")
    target.add_argument("--corpus", choices=list(CORPORA), default="pydocs")
    target.add_argument("--steps", type=int, default=60)
    target.add_argument("--seeds", type=int, nargs="+", default=[SEED])
    target.add_argument(
        "--lr", default="auto", type=lambda text: read_value("float or auto", text),
        help="softprompt's --lr (default: auto, its default)",
    )  # fmt: skip
    paired = sub.add_parser(
        "paired", help="contestants against the reference seed by seed, with a 95%% interval"
    )
    paired.add_argument("--model", choices=list(MODELS), default="smollm2")
    paired.add_argument("--corpus", choices=list(CORPORA), default="pydocs")
    paired.add_argument("--steps", type=int, default=60)
    paired.add_argument("--contestants", nargs="+", help="default: every one with --min-seeds")
    paired.add_argument("--min-seeds", type=int, default=2)
    check = sub.add_parser(
        "check", help="the study's step and evaluator are softprompt's and PEFT's"
    )
    check.add_argument("--steps", type=int, default=3)
    for p in (run, table, target, paired):
        p.add_argument("--results", type=Path, default=RESULTS)
        p.add_argument("--block-size", type=int, default=256)
        p.add_argument("--batch-size", type=int, default=4)
    for p in (table, paired):
        p.add_argument("--reference", default="peft:0.03:const:peft-text")
        p.add_argument(
            "--dtype", default="bfloat16", choices=[d for d in DTYPES if d != "auto"],
            help="the results computed in this dtype (the model's: softprompt picks bfloat16 "
            "on CPUs with AMX or AVX512-BF16, float32 on others)",
        )  # fmt: skip
    run.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    if args.cmd == "run":
        import torch

        print(
            f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
    commands = {
        "run": cmd_run, "table": cmd_table, "paired": cmd_paired, "target": cmd_target,
        "check": cmd_check,
    }  # fmt: skip
    commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
