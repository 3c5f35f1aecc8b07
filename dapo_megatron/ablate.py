"""``python -m dapo_megatron.ablate --config FILE [--seeds 3] [--arms a,b] [--out DIR]``: the DAPO ablation.

Each *arm* is a set of config overrides on the one config (:data:`ARMS`, one line per arm, each
naming the arm it builds on). Every (arm, seed) runs as its own ``python -m dapo_megatron.train``
subprocess (``--jobs`` at a time, one thread each) in ``OUT/<arm>/seed<k>``. Resumable: a run
that finished has a ``done.json`` and is skipped; an unfinished one is started again with
``checkpoint.resume=auto`` and continues from its last checkpoint. At the end (or with
``--report-only``) it writes ``OUT/ablation.md`` (mean +- std over seeds per arm) and PNG plots.

The base config is DAPO; the chain of the paper's table starts from GRPO (sequence-mean token-mean
loss, symmetric clip 0.2, KL loss 0.001 against the reference policy, no dynamic sampling, no
overlong shaping) and adds one DAPO component per row; the ``dapo`` row also drops the KL term (as
DAPO does), so it is exactly the base config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Arm:
    """One row of the ablation: ``overrides`` on top of the arm ``parent`` (or the base config)."""

    name: str
    parent: str | None
    overrides: tuple[str, ...]
    description: str = ""
    #: the plot panel: ``"chain"`` (the paper's table, GRPO -> DAPO) or ``"beyond"`` (options on DAPO)
    group: str = "chain"


GRPO = (
    "algorithm.loss_agg_mode=seq-mean-token-mean",
    "algorithm.clip_ratio_high=0.2",
    "algorithm.kl_coef=0.001",
    "algorithm.use_kl_loss=true",
    "algorithm.kl_type=low_var_kl",
    "algorithm.dynamic_sampling=false",
    "algorithm.overlong_buffer_enable=false",
)

#: The arms, in table order. Adding an arm is one line here.
ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm("grpo", None, GRPO, "GRPO: seq-mean-token-mean, clip 0.2/0.2, KL loss 0.001"),
        Arm("+dynamic_sampling", "grpo", ("algorithm.dynamic_sampling=true",), "+ dynamic sampling"),
        Arm("+clip_higher", "+dynamic_sampling", ("algorithm.clip_ratio_high=0.28",), "+ Clip-Higher (0.28)"),
        Arm("+token_level_loss", "+clip_higher", ("algorithm.loss_agg_mode=token-mean",), "+ token-level loss"),
        Arm(
            "dapo",
            "+token_level_loss",
            ("algorithm.overlong_buffer_enable=true", "algorithm.kl_coef=0.0", "algorithm.use_kl_loss=false"),
            "+ overlong shaping, no KL (= DAPO)",
        ),
        Arm("dapo+overlong_filter", "dapo", ("algorithm.overlong_filter=true",), "DAPO + overlong filtering"),
        Arm(
            "dapo+entropy_top_rho",
            "dapo",
            ("algorithm.token_weighting=entropy_top_rho",),
            "DAPO + top-20% entropy tokens",
            "beyond",
        ),
        Arm("dapo+clip_cov", "dapo", ("algorithm.policy_loss=clip_cov",), "DAPO + Clip-Cov", "beyond"),
        Arm("dapo+kl_cov", "dapo", ("algorithm.policy_loss=kl_cov",), "DAPO + KL-Cov", "beyond"),
        Arm("dapo+adaptive_clip", "dapo", ("algorithm.adaptive_clip_high=true",), "DAPO + entropy-targeted Clip-Higher", "beyond"),
        Arm("dapo+prompt_skipping", "dapo", ("algorithm.prompt_skipping=true",), "DAPO + prompt skipping", "beyond"),
    )
}


def arm_overrides(name: str, arms: dict[str, Arm] = ARMS) -> list[str]:
    """The overrides of arm ``name``: its ancestors' first, its own last (later ones win)."""
    if name not in arms:
        raise ValueError(f"unknown arm {name!r}; arms: {', '.join(arms)}")
    chain, seen = [], set()
    while name is not None:
        if name in seen:
            raise ValueError(f"arm {name!r}: its parents form a cycle")
        seen.add(name)
        chain.append(arms[name])
        name = arms[name].parent
    return [o for arm in reversed(chain) for o in arm.overrides]


def select_arms(spec: str | None, arms: dict[str, Arm] = ARMS) -> list[str]:
    """``--arms a,b`` -> ``["a", "b"]`` (all arms for ``None``); unknown names are an error."""
    if not spec:
        return list(arms)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in arms]
    if bad:
        raise ValueError(f"--arms: unknown arm(s) {bad}; arms: {', '.join(arms)}")
    return names


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / arm.replace("+", "plus_") / f"seed{seed}"


# ------------------------------------------------------------------------------------ running


PORT_RETRIES = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(config: str, arm: str, seed: int, directory: Path, extra: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dapo_megatron.train",
        "--config",
        config,
        *arm_overrides(arm),
        f"trainer.seed={seed}",
        f"data.seed={seed}",
        f"trainer.run_dir={directory}",
        "checkpoint.resume=auto",
        *extra,
    ]


def run_one(config: str, arm: str, seed: int, out: Path, extra: Sequence[str]) -> tuple[str, int, int]:
    """Run (or resume) one training run; writes ``done.json`` on success. Returns (arm, seed, rc)."""
    directory = run_dir(out, arm, seed)
    directory.mkdir(parents=True, exist_ok=True)
    cmd = train_command(config, arm, seed, directory, extra)
    t0 = time.monotonic()
    for _attempt in range(PORT_RETRIES):
        # A free port now may be taken before the run binds it (a busy machine): retry with another.
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            DAPO_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            MASTER_PORT=str(_free_port()),
        )
        with open(directory / "train.log", "a") as log:
            start = log.tell()
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        with open(directory / "train.log", errors="replace") as log:
            log.seek(start)
            if rc == 0 or "EADDRINUSE" not in log.read():
                break
    if rc == 0:
        done = {"arm": arm, "seed": seed, "seconds": round(time.monotonic() - t0, 1), "command": cmd}
        tmp = directory / "done.json.tmp"
        tmp.write_text(json.dumps(done, indent=2) + "\n")
        tmp.replace(directory / "done.json")
    return arm, seed, rc


def pending_runs(out: Path, arms: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    """(arm, seed) pairs without a ``done.json``: every arm's first seed, then every arm's second...
    (an ablation stopped early still has every arm)."""
    return [(a, s) for s in seeds for a in arms if not (run_dir(out, a, s) / "done.json").is_file()]


def prepare_bundled_task(config: str, overrides: Sequence[str] = ()) -> None:
    """Build the multi-step task's model and data at the config's paths if they are missing
    (``python -m dapo_megatron.demo.multistep``, a subprocess: entry points do not import each other)."""
    from dapo_megatron.config import load_config

    cfg = load_config(config, overrides, require_inputs=False)
    model = Path(cfg.model.hf_dir)
    files = [*cfg.data.train_files, *cfg.data.val_files]
    missing = [f for f in files if not Path(f).is_file()]
    if (model / "config.json").is_file() and not missing:
        return
    data_dirs = sorted({str(Path(f).parent) for f in missing})
    if len(data_dirs) > 1:
        raise ValueError(f"data files to build must share one directory, got {data_dirs}")
    cmd = [sys.executable, "-m", "dapo_megatron.demo.multistep", "--out", str(model)]
    cmd += ["--data", data_dirs[0]] if data_dirs else []
    print(f"[ablate] building the bundled multi-step task: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


# -------------------------------------------------------------------------------- aggregation


def read_metrics(directory: Path) -> list[dict[str, Any]]:
    path = directory / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _val_key(rows: list[dict[str, Any]]) -> str | None:
    for r in rows:
        for k in r:
            if k.startswith("val/acc_avg@"):
                return k
    return None


def run_summary(rows: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Per-run figures from its metrics rows (one per step; step 0 = validation before training).

    ``val``: ``[(step, avg@k, generated responses so far)]``; ``final_val`` / ``best_val``: the last
    and the largest of them; ``samples_to_target``: responses generated (dynamic-sampling rounds
    included) up to the first validation with avg@k >= ``target`` (``None``: never reached);
    ``gain``: ``final_val`` minus the first validation (step 0, the starting policy);
    ``final_entropy``: the last step's policy entropy; ``clipfrac_low`` / ``clipfrac_high`` /
    ``responses_per_group`` (responses generated per group trained on): means over the training
    steps; series per step for the plots.
    """
    key = _val_key(rows)
    generated, val, steps = 0.0, [], []
    # One row per step, the last written (a run restarted before its first checkpoint logs step 0 again).
    for r in sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"]):
        generated += r.get("rollout/generated_responses", 0.0)
        if key and key in r:
            val.append((r["step"], r[key], generated))
        if "entropy" in r:
            steps.append(r)
    reach = next((g for _, acc, g in val if acc >= target), None)

    def mean(key: str) -> float:
        vals = [r[key] for r in steps if key in r]
        return sum(vals) / len(vals) if vals else math.nan

    return {
        "val": val,
        "final_val": val[-1][1] if val else math.nan,
        "best_val": max(acc for _, acc, _ in val) if val else math.nan,
        "gain": val[-1][1] - val[0][1] if val else math.nan,
        "samples_to_target": reach,
        "final_entropy": steps[-1]["entropy"] if steps else math.nan,
        "clipfrac_low": mean("pg_clipfrac_low"),
        "clipfrac_high": mean("pg_clipfrac_high"),
        "responses_per_group": mean("rollout/responses_per_kept_group"),
        "final_response_length": steps[-1].get("response_length/mean", math.nan) if steps else math.nan,
        "final_truncated": steps[-1].get("response_length/clip_ratio", math.nan) if steps else math.nan,
        "generated": generated,
        "steps": [r["step"] for r in steps],
        "entropy": [r["entropy"] for r in steps],
        "response_length": [r.get("response_length/mean", math.nan) for r in steps],
        "last_step": steps[-1]["step"] if steps else 0,
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1``; 0 for a single value)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


COLUMNS = (
    ("final_val", "final val avg@k", "{:.3f}"),
    ("best_val", "best val", "{:.3f}"),
    ("gain", "gain over step 0", "{:+.3f}"),
    ("samples_to_target", "responses to target", "{:.0f}"),
    ("generated", "responses generated", "{:.0f}"),
    ("responses_per_group", "responses per trained group", "{:.1f}"),
    ("final_entropy", "final entropy", "{:.3f}"),
    ("clipfrac_low", "clipfrac low", "{:.4f}"),
    ("clipfrac_high", "clipfrac high", "{:.4f}"),
    ("final_response_length", "final resp. len", "{:.1f}"),
    ("final_truncated", "final truncated", "{:.3f}"),
)


def aggregate(summaries: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per arm: ``{column: (mean, std)}`` over its seeds, plus ``reached`` (seeds that hit the target)
    and ``seeds``. ``samples_to_target`` averages the seeds that reached the target."""
    out = {}
    for arm, runs in summaries.items():
        row: dict[str, Any] = {key: mean_std([r[key] for r in runs]) for key, _, _ in COLUMNS}
        row["reached"] = sum(r["samples_to_target"] is not None for r in runs)
        row["seeds"] = len(runs)
        out[arm] = row
    return out


def markdown_table(agg: dict[str, dict[str, Any]], *, target: float, val_key: str = "avg@k") -> str:
    head = ["arm", "seeds"] + [c[1].replace("avg@k", val_key) for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, row in agg.items():
        cells = [f"`{arm}`", str(row["seeds"])]
        for key, _, fmt in COLUMNS:
            m, s = row[key]
            if math.isnan(m):
                cell = "n/a"
            elif row["seeds"] == 1:
                cell = fmt.format(m)  # no spread from one seed
            else:
                cell = f"{fmt.format(m)} ± {fmt.replace('+', '').format(s)}"  # a spread has no sign
            if key == "samples_to_target":
                cell = f"{cell} ({row['reached']}/{row['seeds']} reached {target:g})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_panels(summaries: dict[str, list[dict[str, Any]]]) -> list[tuple[str, list[str]]]:
    """The plot panels: ``(title, arms)`` per :attr:`Arm.group` present, ``dapo`` in each as the
    reference line (an arm missing from :data:`ARMS` goes with the chain)."""
    groups: dict[str, list[str]] = {}
    for arm in summaries:
        groups.setdefault(ARMS[arm].group if arm in ARMS else "chain", []).append(arm)
    titles = {"chain": "GRPO -> DAPO (the paper's table)", "beyond": "beyond DAPO (options on DAPO)"}
    panels = []
    for group, arms in groups.items():
        if "dapo" in summaries and "dapo" not in arms:
            arms = ["dapo", *arms]
        panels.append((titles.get(group, group), arms))
    return panels


def plot(summaries: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    """One PNG per quantity, a panel per arm group (:func:`plot_panels`), one line per arm (mean
    over seeds) with a +-1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def series(runs, xs_of, ys_of):
        n = min(len(ys_of(r)) for r in runs)
        if n == 0:
            return None
        xs = np.mean([xs_of(r)[:n] for r in runs], axis=0)
        ys = np.array([ys_of(r)[:n] for r in runs], dtype=float)
        return xs, ys.mean(axis=0), ys.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(n)

    specs = [
        ("val_acc_vs_step.png", "step", "val avg@k", lambda r: [v[0] for v in r["val"]], lambda r: [v[1] for v in r["val"]]),
        (
            "val_acc_vs_responses.png",
            "generated responses",
            "val avg@k",
            lambda r: [v[2] for v in r["val"]],
            lambda r: [v[1] for v in r["val"]],
        ),
        ("entropy_vs_step.png", "step", "policy entropy", lambda r: r["steps"], lambda r: r["entropy"]),
        ("response_length_vs_step.png", "step", "mean response length", lambda r: r["steps"], lambda r: r["response_length"]),
    ]
    panels = plot_panels(summaries)
    cmap = plt.get_cmap("tab20")  # 20 distinct colours: no two arms share one
    colors = {arm: cmap(i % 20) for i, arm in enumerate(summaries)}
    paths = []
    for name, xlabel, ylabel, xs_of, ys_of in specs:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), dpi=90, squeeze=False, sharey=True)
        for ax, (title, arms) in zip(axes[0], panels):
            for arm in arms:
                runs = summaries[arm]
                s = series(runs, xs_of, ys_of) if runs else None
                if s is None:
                    continue
                xs, m, sd = s
                ax.plot(xs, m, label=f"{arm} ({len(runs)})", lw=1.4, color=colors[arm])
                ax.fill_between(xs, m - sd, m + sd, color=colors[arm], alpha=0.12, lw=0)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
        axes[0][0].set_ylabel(ylabel)
        fig.tight_layout()
        path = out / name
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def report(out: Path, arms: Sequence[str], seeds: Sequence[int], target: float) -> str:
    """Write ``ablation.md`` and the plots from the finished runs; return the markdown."""
    summaries: dict[str, list[dict[str, Any]]] = {}
    val_key, finished, unfinished = "avg@k", [], []
    for arm in arms:
        for seed in seeds:
            d = run_dir(out, arm, seed)
            if not (d / "done.json").is_file():
                unfinished.append(f"{arm}/seed{seed}")
                continue
            rows = read_metrics(d)
            val_key = (_val_key(rows) or "val/avg@k").removeprefix("val/acc_")
            summaries.setdefault(arm, []).append(run_summary(rows, target))
            finished.append(f"{arm}/seed{seed}")
    agg = aggregate(summaries)
    text = [
        "# DAPO ablation\n",
        f"Runs in `{out}`; mean ± std over seeds (sample std). Target accuracy for "
        f"'responses to target': {target:g} ({val_key} on the validation set).\n",
        "| arm | builds on | its own overrides | what it is |\n|---|---|---|---|",
        *[
            f"| `{a}` | {f'`{ARMS[a].parent}`' if ARMS[a].parent else 'the config'} | "
            f"`{' '.join(ARMS[a].overrides)}` | {ARMS[a].description} |"
            for a in arms
        ],
        "",
        markdown_table(agg, target=target, val_key=val_key),
        f"Finished runs: {len(finished)}; unfinished: {', '.join(unfinished) or 'none'}.\n",
    ]
    md = "\n".join(text)
    (out / "ablation.md").write_text(md)
    if summaries:
        plot(summaries, out)
    (out / "summary.json").write_text(
        json.dumps({a: [{k: v for k, v in r.items()} for r in rs] for a, rs in summaries.items()}, indent=1)
    )
    return md


# ------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the base config (e.g. examples/ablation_cpu.yaml)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N per arm")
    parser.add_argument("--arms", default=None, help=f"comma-separated subset of: {', '.join(ARMS)}")
    parser.add_argument("--out", default="runs/ablation", help="output directory")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--target", type=float, default=0.6, help="val accuracy for 'responses to target'")
    parser.add_argument("--report-only", action="store_true", help="only (re)write ablation.md and the plots")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run, e.g. trainer.total_steps=2")
    args = parser.parse_args(argv)
    try:
        arms = select_arms(args.arms)
    except ValueError as e:
        parser.error(str(e))
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(1, args.seeds + 1))
    if not args.report_only:
        from tqdm import tqdm

        prepare_bundled_task(args.config, args.overrides)
        todo = pending_runs(out, arms, seeds)
        total = len(arms) * len(seeds)
        failed = []
        with tqdm(total=total, initial=total - len(todo), desc="ablation", unit="run") as bar:
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                futures = [pool.submit(run_one, args.config, a, s, out, args.overrides) for a, s in todo]
                for f in as_completed(futures):
                    arm, seed, rc = f.result()
                    if rc:
                        failed.append(f"{arm}/seed{seed} (exit {rc}, see {run_dir(out, arm, seed) / 'train.log'})")
                    bar.update(1)
                    bar.set_postfix_str(f"last: {arm}/seed{seed} rc={rc}")
        if failed:
            print("[ablate] failed: " + "; ".join(failed), file=sys.stderr, flush=True)
    print(report(out, arms, seeds, args.target), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
