"""Which training defaults win? A study of learning rate, warmup, decay, init and optimizer,
with PEFT's plain prompt-tuning loop as the reference, on several corpora and model families.

Every contestant trains a 20-token soft prompt with the same step as `softprompt train`
(softprompt.loss.block_loss on [soft][BOS][block], gradient clipping, an optimizer and a
LambdaLR schedule), on the same batches (one seed, so every contestant sees the same blocks
in the same order), and is scored by one evaluator: softprompt.loss.loss_sums (the loss that
`softprompt eval` reports) on a held-out passage, the last EVAL_TOKENS tokens of the corpus,
which no contestant trains on. A contestant is named by a spec string:

    OPTIMIZER:LR:SCHEDULE:INIT      e.g. adamw:0.1:w0-cos0:vocab, adafactor:0.3:const:vocab

- OPTIMIZER: adamw (weight decay 0, clip 1.0: softprompt's step), adafactor (torch's
  Adafactor, relative steps: its step is lr x the soft prompt's RMS), or peft: PEFT's plain
  loop as its docs write it, torch.optim.AdamW with its defaults (weight decay 0.01), no
  clipping, a constant learning rate.
- LR: a number, or rX: X times the RMS of the model's token embeddings (a rule that scales
  with the model).
- SCHEDULE: const, or wW-cosF / wW-linF: linear warmup over a fraction W of the steps, then
  cosine (or linear) decay to F x lr.
- INIT: vocab, text, random (softprompt's --init; text uses the corpus's INIT_TEXT), or
  peft-random / peft-text / peft-vocab: PEFT's own PromptTuningInit RANDOM (torch.nn.Embedding's
  N(0, 1) init), TEXT (the tokenized text, special tokens included, repeated) and
  SAMPLE_VOCAB, built by peft's PromptEmbedding itself.

A contestant with a schedule trains once per step count; a constant-rate one trains once to
the largest and is scored at each. The step is softprompt's, with its kernel for the loss:
`check-peft` shows that PEFT's own forward (get_peft_model, model(input_ids, labels)) trains
the same soft prompt. Results go to a JSONL file, one line per contestant and step count
scored, so a part can be stopped and resumed (done runs are skipped) and the table printed
from what exists.

    PYTHONPATH=. python bench/defaults_study.py run --model smollm2 --corpus austen --stage coarse
    PYTHONPATH=. python bench/defaults_study.py run --model gemma3 --corpus pydocs \\
        --contestants peft:0.03:const:peft-text adamw:r0.3:w0-cos0:vocab --steps 30 300
    PYTHONPATH=. python bench/defaults_study.py target      # 60 steps, 4 x 256, unseen corpus
    PYTHONPATH=. python bench/defaults_study.py table [--results FILE]
    PYTHONPATH=. python bench/defaults_study.py check-peft
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "defaults_study.jsonl"
EVAL_TOKENS = 8192  # the held-out passage: the corpus's last 8,192 tokens
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

# The staged search (what was run is in the README): the coarse grid at 30 and 100 steps on
# the two tuning corpora and both models, then the finalists at 30, 100 and 300 steps on all
# three corpora.
STAGES = {
    "coarse": [  # at 30 steps on SmolLM2 (lr absolute: its embeddings' RMS is 0.136)
        "peft:0.03:const:peft-text",
        "peft:0.03:const:peft-random",
        "adamw:0.03:w0.1-cos0.1:vocab",  # softprompt's defaults before this study
        "adamw:0.03:w0-cos0:vocab",
        "adamw:0.1:w0.1-cos0.1:vocab",
        "adamw:0.1:w0-cos0:vocab",
        "adamw:0.1:const:vocab",
        "adamw:0.3:w0-cos0:vocab",
        "adamw:0.1:w0-cos0:text",
        "adafactor:0.3:const:vocab",  # Lester et al.'s optimizer and rate
        "adafactor:1:w0-cos0:vocab",
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

    @classmethod
    def parse(cls, spec: str) -> Contestant:
        try:
            opt, lr, sched, init = spec.split(":")
        except ValueError:
            raise SystemExit(f"contestant {spec!r}: want OPTIMIZER:LR:SCHEDULE:INIT") from None
        if opt not in ("adamw", "adafactor", "peft"):
            raise SystemExit(f"contestant {spec!r}: optimizer must be adamw, adafactor or peft")
        rel = lr.startswith("r")
        value = float(lr[1:] if rel else lr)
        if sched == "const":
            warmup, decay, floor = 0.0, "const", 1.0
        else:
            m = re.fullmatch(r"w([\d.]+)-(cos|lin)([\d.]+)", sched)
            if not m:
                raise SystemExit(f"contestant {spec!r}: schedule must be const or wW-cosF / wW-linF")
            warmup, decay, floor = float(m[1]), m[2], float(m[3])
        if opt == "peft" and sched != "const":
            raise SystemExit(f"contestant {spec!r}: PEFT's plain loop has a constant rate")
        inits = ("vocab", "text", "random", "peft-random", "peft-text", "peft-vocab")
        if init not in inits:
            raise SystemExit(f"contestant {spec!r}: init must be one of {', '.join(inits)}")
        return cls(spec, opt, None if rel else value, value if rel else None, warmup, decay, floor, init)

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


def load(model: str, compile: bool = True):
    import softprompt
    from softprompt.speed import compile_layers

    lm = softprompt.load_model(MODELS[model], "cpu", "auto")
    if compile:
        compile_layers(lm.model)  # as `softprompt train` does for runs over 2 minutes
    return lm


def corpus_path(name: str) -> Path:
    file = CORPORA[name][0]
    return Path(file) if os.path.isabs(file) else shared_data() / file


def make_setup(lm, model_name: str, corpus: str, block_size: int, batch_size: int) -> Setup:
    """The corpus as one token stream: its last EVAL_TOKENS tokens are the held-out passage
    (cut into blocks), the blocks before them the training data."""
    import numpy as np
    import torch

    from softprompt.data import make_blocks, read_dataset, tokenize_dataset
    from softprompt.soft_prompt import embed_ids

    ids = tokenize_dataset(read_dataset(corpus_path(corpus)), lm.tokenizer).ids[0].astype(np.int64)
    heldout = ids[-EVAL_TOKENS:].reshape(-1, block_size)
    train_blocks = make_blocks(ids[:-EVAL_TOKENS], block_size)
    lead = torch.tensor(lm.bos_ids, dtype=torch.long) if lm.bos_ids else None
    sample = torch.randperm(len(lm.tokenizer), generator=torch.Generator().manual_seed(0))[:4096]
    emb_rms = embed_ids(lm.model, sample).pow(2).mean().sqrt().item()
    return Setup(lm, model_name, corpus, block_size, batch_size, train_blocks, heldout, lead, emb_rms)


def initial(s: Setup, c: Contestant, seed: int):
    """The contestant's starting soft prompt, float32 (N_SOFT, d)."""
    import torch

    from softprompt.soft_prompt import init_tensor

    text = CORPORA[s.corpus][2]
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
    return PromptEmbedding(cfg, s.lm.model.get_input_embeddings()).embedding.weight.detach().float().clone()


def optimizer_for(c: Contestant, soft, emb_rms: float):
    import torch

    lr = c.lr if c.lr is not None else c.lr_rel * emb_rms
    if c.optimizer == "peft":
        return torch.optim.AdamW([soft], lr=lr)  # torch's defaults: weight decay 0.01
    if c.optimizer == "adamw":
        return torch.optim.AdamW([soft], lr=lr, weight_decay=0.0)
    return torch.optim.Adafactor([soft], lr=lr, weight_decay=0.0)


def heldout_loss(s: Setup, soft) -> float:
    from softprompt.loss import loss_sums

    total, count = loss_sums(s.lm.model, soft.detach(), s.heldout, s.batch_size, "cpu", lead=s.lead)
    return total / count


def train_one(s: Setup, c: Contestant, total: int, score_at: list[int], seed: int, record) -> None:
    """Train ``c`` for ``total`` steps, scoring the held-out loss after each of ``score_at``."""
    import torch

    from softprompt.data import BatchSampler
    from softprompt.loss import block_loss

    soft = torch.nn.Parameter(initial(s, c, seed))
    opt = optimizer_for(c, soft, s.emb_rms)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(total, c.warmup, c.decay, c.floor))
    clip = 0.0 if c.optimizer == "peft" else 1.0
    batches = BatchSampler(s.train_blocks, s.batch_size, seed, torch.device("cpu"))
    torch.manual_seed(seed)
    t0, losses = time.perf_counter(), []
    for step in range(1, total + 1):
        loss = block_loss(s.lm.model, soft, batches.batch((step - 1) * s.batch_size), lead=s.lead)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([soft], clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        diverged = not math.isfinite(losses[-1])
        if step in score_at or diverged:
            scoring = time.perf_counter()
            held = math.nan if diverged else heldout_loss(s, soft)
            record(c, total, step, held, sum(losses[-10:]) / len(losses[-10:]), scoring - t0)
            if diverged:
                return
            t0 += time.perf_counter() - scoring  # the scoring is not training time


# ----------------------------------------------------------------------------- results


def read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def key(r: dict) -> tuple:
    return (r["model"], r["corpus"], r["block"], r["batch"], r["seed"], r["contestant"], r["run_steps"], r["at"])


def cmd_run(args) -> None:
    import torch

    contestants = [Contestant.parse(x) for x in (args.contestants or STAGES[args.stage])]
    done = {key(r) for r in read_results(args.results)}
    lm = load(args.model, compile=not args.no_compile)
    s = make_setup(lm, args.model, args.corpus, args.block_size, args.batch_size)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"{args.model} ({lm.dtype}), {args.corpus}: {len(s.train_blocks)} training blocks of "
        f"{args.block_size}, held-out {len(s.heldout)} blocks; embeddings' RMS {s.emb_rms:.4f}",
        flush=True,
    )

    def record(c: Contestant, run_steps: int, at: int, held: float, train: float, secs: float):
        r = {
            "model": args.model, "corpus": args.corpus, "block": args.block_size,
            "batch": args.batch_size, "seed": args.seed, "contestant": c.spec,
            "run_steps": run_steps, "at": at, "heldout_loss": held, "train_loss": train,
            "train_s": round(secs, 1), "torch": torch.__version__, "emb_rms": s.emb_rms,
        }  # fmt: skip
        with args.results.open("a") as fh:
            fh.write(json.dumps(r) + "\n")
        print(f"  {c.spec:32} {at:4d}/{run_steps:<4d} held-out {held:.4f}  train {train:.4f}  {secs:6.0f} s", flush=True)

    steps = sorted(args.steps)
    runs = []  # (contestant, total, score_at): the short runs first, so a part gives results early
    for c in contestants:
        if c.length_free:
            runs.append((c, max(steps), steps))
        else:
            runs.extend((c, n, [n]) for n in steps)
    runs.sort(key=lambda r: r[1])
    for c, total, score_at in runs:
        want = [n for n in score_at if (args.model, args.corpus, args.block_size, args.batch_size, args.seed, c.spec, total, n) not in done]
        if want:
            train_one(s, c, total, score_at, args.seed, record)


# ----------------------------------------------------------------------------- the table


def cell(results: list[dict], spec: str, model: str, corpus: str, steps: int, block: int) -> float | None:
    """The held-out loss of ``spec`` after ``steps`` steps (mean over seeds), or None."""
    vals = [
        r["heldout_loss"] for r in results
        if r["contestant"] == spec and r["model"] == model and r["corpus"] == corpus
        and r["at"] == steps and r["block"] == block
        and (r["run_steps"] == steps or Contestant.parse(spec).length_free)
    ]  # fmt: skip
    return sum(vals) / len(vals) if vals else None


def cmd_table(args) -> None:
    results = [r for r in read_results(args.results) if r["block"] == args.block_size]
    if not results:
        print(f"no results in {args.results} for block {args.block_size}")
        return
    cols = sorted(
        {(r["model"], r["corpus"], r["at"]) for r in results},
        key=lambda k: (list(MODELS).index(k[0]), list(CORPORA).index(k[1]), k[2]),
    )
    cols = [k for k in cols if k[2] in args.steps]
    specs = list(dict.fromkeys(r["contestant"] for r in results))
    ref = args.reference
    width = 7
    print(f"held-out loss (nats/token), block {args.block_size}; rows: contestants; columns: model/corpus/steps")
    heads = [f"{m[:5]}/{c[:5]}/{n}" for m, c, n in cols]
    print(f"{'contestant':32} " + " ".join(f"{h:>{max(width, len(h))}}" for h in heads) + f" {'mean d':>7} {'worst d':>7}")
    rows = []
    for spec in specs:
        vals = [cell(results, spec, m, c, n, args.block_size) for m, c, n in cols]
        refs = [cell(results, ref, m, c, n, args.block_size) for m, c, n in cols]
        deltas = [v - r for v, r in zip(vals, refs) if v is not None and r is not None]
        mean_d = sum(deltas) / len(deltas) if deltas else math.nan
        worst = max(deltas) if deltas else math.nan
        rows.append((spec, vals, mean_d, worst, len(deltas)))
        line = " ".join(
            f"{'-' if v is None else f'{v:.3f}':>{max(width, len(h))}}" for v, h in zip(vals, heads)
        )
        print(f"{spec:32} {line} {mean_d:+7.3f} {worst:+7.3f}")
    print(f"(d: held-out loss minus {ref}'s in the same column, mean and worst over the columns both have)")
    full = [r for r in rows if r[4] == max(x[4] for x in rows) and r[0] != ref]
    if full:
        best = min(full, key=lambda r: r[2])
        print(f"best over the most columns ({best[4]}): {best[0]}  (mean {best[2]:+.3f}, worst {best[3]:+.3f} nats against {ref})")


# ----------------------------------------------------------------------------- the target


def cmd_target(args) -> None:
    """softprompt train with its defaults (the real CLI path, softprompt.train) against PEFT's
    plain loop with text init, 60 steps of 4 x 256 on the unseen corpus, scored alike."""
    import numpy as np
    import torch

    import softprompt
    from softprompt.data import BatchSampler  # noqa: F401  (the same batches: see below)

    lm = load(args.model, compile=False)
    s = make_setup(lm, args.model, args.corpus, args.block_size, args.batch_size)
    out = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "train.txt"
            # the training text alone: softprompt holds out its own validation blocks from it
            text_ids = np.concatenate(list(s.train_blocks))
            data.write_text(lm.tokenizer.decode(text_ids.tolist()), encoding="utf-8")
            t0 = time.perf_counter()
            r = softprompt.train(
                dataset=str(data), output=str(Path(tmp) / "out"), model=lm, max_steps=args.steps,
                batch_size=args.batch_size, block_size=args.block_size, seed=seed,
                progress=False, report=False, eval_every=0, save_every=0,
            )  # fmt: skip
            sp_loss = heldout_loss(s, r.soft_prompt.tensor.float())
            sp_s = time.perf_counter() - t0
        peft = Contestant.parse("peft:0.03:const:peft-text")
        got = {}
        train_one(s, peft, args.steps, [args.steps], seed, lambda c, t, a, h, tr, sec: got.update(h=h))
        out.append((seed, sp_loss, got["h"], r.config.lr, sp_s))
        print(f"seed {seed}: softprompt defaults {sp_loss:.4f} (lr {r.config.lr:g}, {sp_s:.0f} s)  PEFT text {got['h']:.4f}  d {sp_loss - got['h']:+.4f}", flush=True)
    d = [a - b for _, a, b, _, _ in out]
    print(f"mean d over {len(d)} seed(s): {sum(d) / len(d):+.4f} nats (target: -0.02 or lower)")
    del torch


# ----------------------------------------------------------------------------- PEFT check


def cmd_check_peft(args) -> None:
    """PEFT's own model and forward against this study's step for PEFT's loop: the same
    soft prompt after a few steps (SmolLM2: no BOS, so PEFT's labels are the block's)."""
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    lm = load("smollm2", compile=False)
    s = make_setup(lm, "smollm2", "austen", 64, 2)
    c = Contestant.parse("peft:0.03:const:peft-random")
    mine = {}
    torch.manual_seed(0)
    # this study's loop
    from softprompt.data import BatchSampler
    from softprompt.loss import block_loss

    init = initial(s, c, SEED)
    soft = torch.nn.Parameter(init.clone())
    opt = torch.optim.AdamW([soft], lr=0.03)
    batches = BatchSampler(s.train_blocks, 2, SEED, torch.device("cpu"))
    for step in range(args.steps):
        loss = block_loss(lm.model, soft, batches.batch(step * 2))
        loss.backward()
        opt.step()
        opt.zero_grad()
        mine[step] = loss.item()
    # PEFT's
    model = get_peft_model(
        lm.model,
        PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=N_SOFT, prompt_tuning_init=PromptTuningInit.RANDOM),
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
        print(f"step {step + 1}: loss here {mine[step]:.4f}, PEFT's forward {loss.item():.4f}")
    diff = (emb.detach().float() - soft.detach()).abs().max().item()
    print(f"after {args.steps} steps: max |difference| of the soft prompts {diff:.2e} (init RMS {init.pow(2).mean().sqrt():.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="train contestants on one model and corpus")
    run.add_argument("--model", choices=list(MODELS), default="smollm2")
    run.add_argument("--corpus", choices=list(CORPORA), default="austen")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--stage", choices=list(STAGES), default="coarse")
    group.add_argument("--contestants", nargs="+")
    run.add_argument("--steps", type=int, nargs="+", default=[30, 100])
    run.add_argument("--no-compile", action="store_true")
    table = sub.add_parser("table", help="print the table from the results")
    table.add_argument("--steps", type=int, nargs="+", default=[30, 60, 100, 300])
    table.add_argument("--reference", default="peft:0.03:const:peft-text")
    target = sub.add_parser("target", help="the issue's 60-step target on the unseen corpus")
    target.add_argument("--model", choices=list(MODELS), default="smollm2")
    target.add_argument("--corpus", choices=list(CORPORA), default="pydocs")
    target.add_argument("--steps", type=int, default=60)
    target.add_argument("--seeds", type=int, nargs="+", default=[SEED])
    check = sub.add_parser("check-peft", help="PEFT's forward trains the same soft prompt")
    check.add_argument("--steps", type=int, default=3)
    for p in (run, table, target):
        p.add_argument("--results", type=Path, default=RESULTS)
        p.add_argument("--block-size", type=int, default=256 if p is target else 128)
        p.add_argument("--batch-size", type=int, default=4)
    run.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    if args.cmd == "run":
        import torch

        print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    {"run": cmd_run, "table": cmd_table, "target": cmd_target, "check-peft": cmd_check_peft}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
