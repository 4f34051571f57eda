"""`dynasearch bench latency|flops|search|ranking|train`: measurements behind the claims, as CSV + PNG + JSON."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ..data import ACCEPTED as DATA_SPECS
from ._app import app, console, print_frame

_HELP = "Benchmarks: latency vs FLOPs, FLOPs counters, samplers, supernet ranking, sandwich-step cost."
bench_app = typer.Typer(name="bench", help=_HELP, no_args_is_help=True, add_completion=False, rich_markup_mode=None)
app.add_typer(bench_app, name="bench")

# options that read the same in several benchmarks
_OUT = typer.Option(Path("results/bench"), help="Output directory (NAME.csv, NAME.png, NAME.json).")
_THREADS = typer.Option(None, help="torch intra-op threads for the run (default: torch's own); recorded either way.")
_INPUT_SIZE = typer.Option(32, help="Latent side length.")
_IN_CHANNELS = typer.Option(4, help="Latent channels.")
_NUM_CLASSES = typer.Option(1000, help="Number of classes.")
_SUPERNET = typer.Option(Path("runs/demo"), help="Supernet run directory.")
_SPACE = typer.Option(None, help="Search space (default: the supernet's training space).")
_DEVICE = typer.Option("cpu", help="cpu or cuda.")
_DEVICE_BF16 = typer.Option("cpu", help="cpu or cuda (bf16 autocast).")


def _split(text: str, option: str, cast: Callable[[str], Any] = str) -> tuple[Any, ...]:
    from ..bench import BenchError

    items = [s.strip() for s in text.split(",") if s.strip()]
    try:
        return tuple(cast(s) for s in items)
    except ValueError:
        raise BenchError(f"{option} must be a comma-separated list, got '{text}'") from None


def _run(
    gather: Callable[[Callable[[str], None]], Any],
    out: Path,
    title: Callable[[Any], str],
    columns: list[str] | None = None,
) -> Any:
    """Gather with a status line, write the files, print the table (title from the result), and the notes."""
    from ..bench import save_bench

    if console.is_terminal:
        with console.status("benchmarking") as status:
            result = gather(lambda msg: status.update(msg))
    else:  # a log file (nohup, CI): one timestamped line per stage instead of a spinner nobody sees
        result = gather(
            lambda msg: console.print(f"[{time.strftime('%H:%M:%S')}] {msg}", highlight=False, markup=False)
        )
    files = save_bench(result, out)
    table = result.table if columns is None else result.table[[c for c in columns if c in result.table.columns]]
    print_frame(table, title(result))
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    console.print(f"machine: {result.machine['device_name']}, {result.machine['threads']} threads, "
                  f"torch {result.machine['torch']}", highlight=False)
    console.print("wrote " + ", ".join(str(p) for p in files), highlight=False)
    return result


@bench_app.command("latency")
def latency(
    model: str = typer.Option("DiT-B/2", help="Registry model (ignored with --supernet)."),
    input_size: int = _INPUT_SIZE,
    in_channels: int = _IN_CHANNELS,
    num_classes: int = _NUM_CLASSES,
    batch: int = typer.Option(8, help="Batch size of each timed forward pass."),
    device: str = _DEVICE_BF16,
    repeats: int = typer.Option(10, help="Timed runs per model and round (the median is kept)."),
    warmup: int = typer.Option(3, help="Untimed runs before each model's timed runs."),
    rounds: int = typer.Option(3, help="Round-robin passes over all models (median of the per-round medians)."),
    ratios: str = typer.Option("0.3,0.4,0.5,0.6,0.7", help="FLOPs ratios of the uniform subnets."),
    supernet: Path | None = typer.Option(None, help="Supernet run directory (default: random weights)."),
    search_results: Path | None = typer.Option(None, help="A search output directory: time its exported subnets too."),
    threads: int | None = _THREADS,
    seed: int = typer.Option(0, help="Seed of the random weights and of the mixed subnets."),
    mixed: int = typer.Option(0, help="Per ratio, random per-block subnets (heads, MLP width, token ratio per block, "
                                      "as searched ones) within 2% of the ratio's FLOPs."),
    mixed_space: str = typer.Option("blockwise", help="Search space the mixed subnets are drawn from."),
    out: Path = _OUT,
) -> None:
    """Sliced subnets against the full model: FLOPs ratio, latency ratio and their quotient (1.0 = ideal)."""
    from ..bench import LatencyBenchConfig, bench_latency

    cfg = LatencyBenchConfig(model=model, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                             batch=batch, device=device, repeats=repeats, warmup=warmup, rounds=rounds,
                             ratios=_split(ratios, "--ratios", float), supernet=supernet,
                             search_results=search_results, threads=threads, seed=seed, mixed=mixed,
                             mixed_space=mixed_space)
    result = _run(lambda _s: bench_latency(cfg), out,
                  lambda r: f"latency: {r.summary['model']}, batch {batch}, {device} ({r.summary['dtype']})",
                  ["name", "gflops", "flops_ratio", "latency_ms", "latency_ratio", "quotient", "within_10pct"])
    s = result.summary
    verdict = "met" if s["target_met"] else "not met"
    quotient = "n/a" if s["quotient_mean_in_range"] is None else f"{s['quotient_mean_in_range']:.3f}"
    console.print(f"target ({s['target']}): {verdict}; mean quotient in range {quotient}", highlight=False)


@bench_app.command("latency-table")
def latency_table(
    model: str = typer.Option("DiT-B/2", help="Registry model the table is for."),
    input_size: int = _INPUT_SIZE,
    in_channels: int = _IN_CHANNELS,
    num_classes: int = _NUM_CLASSES,
    batch: int = typer.Option(8, help="Batch size of every timed call (predictions hold at this batch)."),
    device: str = _DEVICE,
    dtype: str = typer.Option("fp32", help="fp32, or bf16 (autocast)."),
    space: str = typer.Option("blockwise", help="Search space: its token ratios are measured, its random subnets "
                                                "validate the table."),
    token_ratios: str | None = typer.Option(None, help="Comma-separated token ratios to measure (default: the "
                                                       "space's)."),
    repeats: int = typer.Option(10, help="Timed calls per entry and per validation subnet (the median is kept)."),
    warmup: int = typer.Option(3, help="Untimed calls before each entry's timed ones."),
    rounds: int = typer.Option(1, help="Passes over every entry and validation subnet (median of the rounds)."),
    copies: int = typer.Option(
        4, help="Block copies each entry rotates over (distinct weights, as in a forward pass)."
    ),
    validate: int = typer.Option(8, help="Random subnets of the space timed whole against the prediction (0: none)."),
    calibrate: int = typer.Option(4, help="Whole forwards the prediction's scale is fitted on (the full model, the "
                                          "smallest subnet, random others; never the validation ones; 0: none)."),
    threads: int | None = _THREADS,
    seed: int = typer.Option(0, help="Seed of the random weights and of the validation subnets."),
    table: Path | None = typer.Option(None, help="Where to write the table (default: OUT/latency-table-DEVICE"
                                                 ".table.json)."),
    out: Path = _OUT,
) -> None:
    """Latency of every block choice, the embedders and the final layer on this device; predicted against
    measured latency of random subnets."""
    from ..bench import LatencyTableConfig, bench_latency_table

    ratios = None if token_ratios is None else _split(token_ratios, "--token-ratios", float)
    cfg = LatencyTableConfig(model=model, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                             batch=batch, device=device, dtype=dtype, space=space, token_ratios=ratios,
                             repeats=repeats, warmup=warmup, rounds=rounds, copies=copies, validate=validate,
                             calibrate=calibrate, threads=threads, seed=seed)
    result = _run(lambda status: bench_latency_table(cfg, status), out,
                  lambda r: f"latency table: {r.summary['model']}, batch {batch}, {r.summary['device']} "
                            f"({r.summary['dtype']})",
                  ["name", "role", "subnet", "flops_ratio", "predicted_ms", "measured_ms", "error_pct",
                   "unscaled_error_pct"])
    path = table if table is not None else out / f"{result.name}.table.json"
    result.latency_table.save(path)
    s = result.summary
    if s["median_abs_error_pct"] is not None:
        verdict = "met" if s["target_met"] else "not met"
        console.print(f"prediction error over {s['validated_subnets']} validation subnets: median "
                      f"{s['median_abs_error_pct']:.1f}%, max {s['max_abs_error_pct']:.1f}% (target {s['target']}: "
                      f"{verdict}); without the scale {s['scale']:.3f}: median "
                      f"{s['unscaled_median_abs_error_pct']:.1f}%", highlight=False)
    console.print(f"wrote the table {path} ({s['entries']} entries)", highlight=False)


@bench_app.command("gpu")
def gpu(
    device: str = typer.Option("cuda", help="cuda (the check), or cpu (with --tiny: the code path only)."),
    tiny: bool = typer.Option(False, help="DiT-N/2 at 8x8x1 instead of DiT-XL/2 at 32x32x4 (seconds; for tests)."),
    batches: str = typer.Option("32,64", help="Batch sizes of the latency quotients."),
    ratios: str = typer.Option("0.3,0.4,0.5,0.6,0.7", help="FLOPs ratios of the uniform and per-block subnets."),
    compile: bool = typer.Option(True, help="Also time the full model and --compile-ratios under torch.compile."),
    compile_ratios: str = typer.Option("0.5", help="FLOPs ratios timed under torch.compile too."),
    repeats: int = typer.Option(20, help="Timed forward passes per model (the median is kept)."),
    warmup: int = typer.Option(5, help="Untimed passes first (compilation happens here)."),
    train_batch: int = typer.Option(32, help="Batch size of the sandwich training step."),
    train_steps: int = typer.Option(5, help="Timed sandwich steps."),
    proxy_samples: int = typer.Option(512, help="Quadruples of the proxy whose throughput is measured."),
    proxy_trials: int = typer.Option(5, help="Timed proxy evaluations (random subnets)."),
    seed: int = typer.Option(0, help="Seed of the weights and subnets."),
    table: Path | None = typer.Option(None, help="Where to write the latency table (default: OUT/gpu-DEVICE"
                                                 ".table.json)."),
    out: Path = _OUT,
) -> None:
    """The prepared GPU check: bf16 latency quotients (eager and compiled), the latency table's error, a
    sandwich step and proxy throughput of DiT-XL/2, written as gpu-cuda.*."""
    from ..bench import GpuCheckConfig, bench_gpu

    cfg = GpuCheckConfig(device=device, tiny=tiny, batches=_split(batches, "--batches", int),
                         ratios=_split(ratios, "--ratios", float), compile=compile,
                         compile_ratios=_split(compile_ratios, "--compile-ratios", float), repeats=repeats,
                         warmup=warmup, train_batch=train_batch, train_steps=train_steps, proxy_samples=proxy_samples,
                         proxy_trials=proxy_trials, seed=seed)
    result = _run(lambda status: bench_gpu(cfg, status), out,
                  lambda r: f"GPU check: {r.summary['model']}, {r.summary['device_name']} ({r.summary['dtype']})",
                  ["batch", "compiled", "name", "flops_ratio", "latency_ms", "latency_per_flops"])
    path = table if table is not None else out / f"{result.name}.table.json"
    result.latency_table.save(path)
    s = result.summary
    console.print(f"latency ({s['latency_target']}): {'met' if s['latency_target_met'] else 'not met'}; table error "
                  f"median {s['table_median_abs_error_pct']:.1f}%; sandwich {s['sandwich_over_ideal']:.2f}x ideal "
                  f"({'met' if s['sandwich_target_met'] else 'not met'}); proxy {s['proxy_trials_per_minute']:.1f} "
                  "trials/min", highlight=False)
    console.print(f"wrote the table {path}", highlight=False)


@bench_app.command("flops")
def flops(
    models: str = typer.Option("all", help="Comma-separated registry models, or 'all'."),
    input_size: int = _INPUT_SIZE,
    in_channels: int = _IN_CHANNELS,
    num_classes: int = _NUM_CLASSES,
    batch: int = typer.Option(1, help="Batch size."),
    threads: int | None = _THREADS,
    out: Path = _OUT,
) -> None:
    """The registry's GFLOPs by fvcore (with the attention handler) and in closed form, and its parameters."""
    from ..bench import FlopsBenchConfig, bench_flops
    from ..model.config import DIT_CONFIGS

    names = tuple(DIT_CONFIGS) if models.strip() == "all" else _split(models, "--models")
    cfg = FlopsBenchConfig(models=names, input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                           batch=batch, threads=threads)
    result = _run(lambda _s: bench_flops(cfg), out, lambda r: f"FLOPs: {r.summary['data']}",
                  ["model", "params_m", "gflops_fvcore", "gflops_closed_form", "match", "params_match"])
    console.print(f"fvcore == closed form for every model: {result.summary['all_match']}", highlight=False)


@bench_app.command("search")
def search(
    supernet: Path = _SUPERNET,
    trials: int = typer.Option(60, help="Trials per run."),
    seeds: int = typer.Option(3, help="Runs (sampler seeds) per sampler."),
    samplers: str = typer.Option("tpe,nsga2,gp,random,random-feasible",
                                 help="Comma-separated samplers; random-feasible redraws until a subnet fits the "
                                      "budget."),
    flops: str = typer.Option("0.5x", help="FLOPs budget: 50G, 500M, 0.5x or 50%."),
    space: str | None = _SPACE,
    proxy_samples: int = typer.Option(512, help="Validation quadruples in the quality proxy."),
    seed: int = typer.Option(0, help="First sampler seed and the proxy set's seed."),
    enqueue: bool = typer.Option(True, help="Start each study with the largest, smallest and best uniform subnet."),
    device: str = _DEVICE,
    threads: int | None = _THREADS,
    out: Path = _OUT,
) -> None:
    """Hypervolume against trials per sampler; trials needed to reach random search's final hypervolume."""
    from ..bench import SearchBenchConfig, bench_search

    cfg = SearchBenchConfig(supernet=supernet, trials=trials, seeds=seeds, samplers=_split(samplers, "--samplers"),
                            flops=flops, space=space, proxy_samples=proxy_samples, seed=seed, enqueue=enqueue,
                            device=device, threads=threads)
    result = _run(lambda status: bench_search(cfg, status), out,
                  lambda r: f"search: {r.summary['model']}, {trials} trials x {seeds} seeds, budget {flops}",
                  ["sampler", "feasible_fraction", "final_hv_mean", "final_hv_std", "trials_to_random_final",
                   "fraction_of_trials", "goal_met", "trials_to_random_final_per_seed",
                   "trials_to_random_feasible_final"])
    console.print(f"goal ({result.summary['goal']}): {result.summary['goal_met']}", highlight=False)


@bench_app.command("ranking")
def ranking(
    supernet: Path = _SUPERNET,
    k: int = typer.Option(8, help="Subnets, spread over the FLOPs range."),
    finetune_steps: int = typer.Option(200, help="Fine-tuning steps of each sliced subnet."),
    batch_size: int = typer.Option(64, help="Fine-tuning batch size."),
    lr: float = typer.Option(1e-4, help="Fine-tuning AdamW learning rate (the peak with --lr-schedule cosine)."),
    lr_schedule: str = typer.Option("cosine", help="constant, or cosine (5% linear warm-up, then cosine to 0)."),
    finetune_seeds: int = typer.Option(1, help="Fine-tunes per subnet with different batch seeds (losses averaged)."),
    space: str | None = _SPACE,
    proxy_samples: int = typer.Option(512, help="Validation quadruples in the quality proxy (the inherited side)."),
    eval_samples: int = typer.Option(2048, help="Quadruples of the separate set the fine-tuned models are scored on."),
    bootstrap: int = typer.Option(2000, help="Bootstrap resamplings of the subnets for tau's 95% interval."),
    flops_range: str = typer.Option("0,1", help="LO,HI: FLOPs ratios the subnets are drawn from (e.g. 0.45,0.55)."),
    fd_samples: int = typer.Option(0, help="Samples per fine-tuned model for the FD ground truth (0: loss only)."),
    fd_steps: int = typer.Option(50, help="DDIM steps of the FD samples."),
    seed: int = typer.Option(0, help="Seed of the subnet choice, the batches and the proxy set."),
    device: str = _DEVICE,
    threads: int | None = _THREADS,
    out: Path = _OUT,
) -> None:
    """Kendall tau between every proxy kind's value of the inherited subnets and their loss (and FD) after
    fine-tuning alone."""
    from ..bench import RankingBenchConfig, bench_ranking

    cfg = RankingBenchConfig(supernet=supernet, k=k, finetune_steps=finetune_steps, batch_size=batch_size, lr=lr,
                             lr_schedule=lr_schedule, finetune_seeds=finetune_seeds, space=space,
                             proxy_samples=proxy_samples, eval_samples=eval_samples, bootstrap=bootstrap,
                             flops_range=_split(flops_range, "--flops-range", float), fd_samples=fd_samples,
                             fd_steps=fd_steps, seed=seed, device=device, threads=threads)
    result = _run(lambda status: bench_ranking(cfg, status), out,
                  lambda r: f"ranking: {r.summary['model']}, {k} subnets, {finetune_steps} fine-tuning steps",
                  ["subnet", "flops_ratio", "inherited_loss", "finetuned_loss", "rank_inherited", "rank_finetuned",
                   "improvement"])
    s = result.summary

    def fmt(value: float | None) -> str:
        """Two or three decimals, or a word where the value is undefined."""
        return "undefined" if value is None or value != value else f"{value:.3f}"  # None or NaN

    lo, hi = s["tau_ci95"]
    console.print(f"Kendall tau {fmt(s['kendall_tau'])} (p {fmt(s['p_value'])}, bootstrap 95% {fmt(lo)}..{fmt(hi)}; "
                  f"goal {s['goal']}: {'met' if s['goal_met'] else 'not met'}); same evaluation set "
                  f"{fmt(s['kendall_tau_same_set'])}; proxy vs evaluation set "
                  f"{fmt(s['kendall_tau_proxy_vs_evalset'])}; FLOPs-only baseline "
                  f"{fmt(s['kendall_tau_flops_baseline'])}", highlight=False)
    for r in result.extra["proxies"].itertuples(index=False):
        console.print(f"proxy {r.proxy} vs {r.ground_truth}: tau {fmt(r.kendall_tau)} (bootstrap 95% "
                      f"{fmt(r.tau_ci95_lo)}..{fmt(r.tau_ci95_hi)}), {1000 * r.score_s:.0f} ms per subnet",
                      highlight=False)


@bench_app.command("train")
def train(
    model: str = typer.Option("DiT-T/2", help="Registry model."),
    steps: int = typer.Option(20, help="Timed steps."),
    warmup: int = typer.Option(3, help="Untimed steps first."),
    batch_size: int = typer.Option(64, help="Batch size."),
    sandwich: int = typer.Option(2, help="Random subnets per step besides the largest and smallest."),
    distill: float = typer.Option(1.0, help="In-place distillation weight."),
    space: str = typer.Option("blockwise", help="Search space the subnets are drawn from."),
    data: str = typer.Option("digits", help=f"Training data: {DATA_SPECS}."),
    image_size: int | None = typer.Option(None, help="Resize images to this side."),
    device: str = _DEVICE_BF16,
    seed: int = typer.Option(0, help="Seed of the weights, batches and subnets."),
    threads: int | None = _THREADS,
    out: Path = _OUT,
) -> None:
    """The sandwich step's time against the FLOPs-proportional ideal of its subnets."""
    from ..bench import TrainBenchConfig, bench_train

    cfg = TrainBenchConfig(model=model, steps=steps, warmup=warmup, batch_size=batch_size, sandwich=sandwich,
                           distill=distill, space=space, data=data, image_size=image_size, device=device, seed=seed,
                           threads=threads)
    result = _run(lambda status: bench_train(cfg, status), out,
                  lambda r: f"sandwich step: {model}, batch {batch_size}, {r.summary['device']}")
    console.print(f"sandwich step / FLOPs-proportional ideal: {result.summary['overhead_median']:.2f}x (median)",
                  highlight=False)
