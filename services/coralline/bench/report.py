"""Writes a `coralline bench` report: bench.json, bench.md and three PNG plots.

  speedup.png              tokens/s over the HF baseline of the same temperature, per method
  tau_by_verifier.png      tau of every engine method at T = 0 and of each verifier at T = 1
  acceptance_by_depth.png  share of rounds accepting at least d drafts, per engine method
Knows only the report dict built by bench/side_by_side.py (matplotlib, headless).
display_path() is how every bench report (this one, bench/coral.py's, bench/pipeline.py's)
writes a filesystem path.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

PLOTS = ("speedup.png", "tau_by_verifier.png", "acceptance_by_depth.png")


def display_path(path: str | os.PathLike) -> str:
    """A filesystem path as a report records it, free of this machine's layout: relative to the
    current folder when inside it (run from a checkout: services/coralline/data/...), else
    relative to the folder the coralline package is imported from when inside it
    (coralline/data/...), else with the home folder written "~" (~/.cache/coralline/...).
    Relative paths, names that are not paths, and paths elsewhere are returned unchanged."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    if not os.path.isabs(text):
        return text
    given = Path(os.path.normpath(text))
    roots = [
        (Path.cwd(), ""),
        (Path(str(resources.files("coralline"))).parent, ""),
        (Path(os.path.expanduser("~")), "~"),  # stays "~" (skipped below) when unknown
    ]
    for root, prefix in roots:
        if not root.is_absolute() or len(root.parts) < 2:  # nor relative to "/" itself
            continue
        for p, r in ((given, root), (given.resolve(), root.resolve())):
            if p.is_relative_to(r):
                rel = p.relative_to(r).as_posix()
                if prefix:
                    return prefix if rel == "." else f"{prefix}/{rel}"
                return rel
    return text


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(report: dict, temperature: float) -> list[str]:
    rows = [r for r in report["results"] if r["temperature"] == temperature]
    head = (
        "| method | tokens/s | speedup | tau | draft ms/round | verify ms/round "
        "| accepted >= 1 / 3 / 6 | peak MB (+added) |"
    )
    if temperature == 0:
        head += " identical |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        depth = r["acceptance_by_depth"]
        acc = "-" if depth is None else " / ".join(f"{depth[d]:.2f}" for d in (0, 2, 5))
        line = (
            f"| {r['label']} | {r['tokens_per_second']:.1f} | {r['speedup']:.2f}x "
            f"| {_fmt(r['tau'], '.2f')} | {_fmt(r['draft_ms_per_round'], '.1f')} "
            f"| {_fmt(r['verify_ms_per_round'], '.1f')} | {acc} "
            f"| {r['peak_memory_mb']:.0f} (+{r['added_memory_mb']:.0f}) |"
        )
        if temperature == 0:
            line += f" {'yes' if r['identical_to_hf_greedy'] else 'NO'} |"
        lines.append(line)
    return lines


def markdown(report: dict) -> str:
    m, c = report["machine"], report["config"]
    sets = ", ".join(f"{k} {v}" for k, v in report["prompt_sets"].items())
    out = [
        f"# coralline bench: {report['what']}",
        "",
        f"- date: {report['date']}",
        f"- machine: {m['cpu']} ({m['cores']} cores), {m['device']}, torch {m['torch']}, "
        f"{m['threads']} thread(s); {m['platform']}" + (f", GPU {m['gpu']}" if "gpu" in m else ""),
        f"- command: `{report['command']}`",
        f"- prompts: {sets}; {c['max_new_tokens']} new tokens each; "
        f"T = 1: {c['t1_seeds']} seed(s) per prompt",
        f"- CORAL head: `{report['checkpoint']}`",
        "",
        "## T = 0 (greedy; speedup over HF `generate`)",
        "",
        *table(report, 0.0),
        "",
        "## T = 1 (sampling; speedup over HF sampling)",
        "",
        *table(report, 1.0),
        "",
        "tau = 1 + accepted drafts per round (HF methods: not measured). "
        "'accepted >= d': share of rounds accepting at least d drafted tokens. "
        "Peak MB: process peak RSS while the method ran, and what the method added to the RSS "
        "it started with (CPU), or peak allocated memory (CUDA).",
    ]
    if report["notes"]:
        out += ["", "Notes:", *(f"- {n}" for n in report["notes"])]
    out += ["", *(f"![{p[:-4]}]({p})" for p in PLOTS), ""]
    return "\n".join(out)


def plots(report: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, t, base in ((axes[0], 0.0, "HF generate"), (axes[1], 1.0, "HF sampling")):
        rows = [r for r in res if r["temperature"] == t]
        ax.barh([r["label"] for r in rows], [r["speedup"] for r in rows], color="tab:blue")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(f"T = {t:g}: speedup over {base}")
        ax.invert_yaxis()
        for y, r in enumerate(rows):
            ax.text(r["speedup"], y, f" {r['speedup']:.2f}x", va="center", fontsize=8)
    fig.tight_layout()
    paths.append(folder / PLOTS[0])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    rows = [r for r in res if r["tau"] is not None and r["method"] != "engine_plain"]
    labels = [f"{r['label']}\nT={r['temperature']:g}" for r in rows]
    colors = ["tab:green" if r["temperature"] == 0 else "tab:orange" for r in rows]
    ax.bar(range(len(rows)), [r["tau"] for r in rows], color=colors)
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("tau (tokens per target forward)")
    ax.set_title("tau by method and verifier (green T = 0, orange T = 1)")
    fig.tight_layout()
    paths.append(folder / PLOTS[1])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        depth = r["acceptance_by_depth"]
        ls = "-" if r["temperature"] == 0 else "--"
        ax.plot(
            range(1, len(depth) + 1),
            depth,
            ls,
            marker="o",
            label=f"{r['label']} T={r['temperature']:g}",
        )
    ax.set_xlabel("depth d")
    ax.set_ylabel("share of rounds accepting >= d drafts")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("acceptance by tree depth")
    fig.tight_layout()
    paths.append(folder / PLOTS[2])
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write(report: dict, folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (folder / "bench.md").write_text(markdown(report))
    return [folder / "bench.json", folder / "bench.md", *plots(report, folder)]


def write_single(report: dict, out: str | Path, markdown_fn, plot_fn) -> list[Path]:
    """A one-file bench's report: out (JSON), out.md (markdown_fn(report, png name)) and out.png
    (plot_fn(report, path)); -> the three paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot_fn(report, png)
    md = out.with_suffix(".md")
    md.write_text(markdown_fn(report, png.name))
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return [out, md, png]
