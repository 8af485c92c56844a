"""A run's result as text: the terminal table, the README's markdown tables, the sampling-cost table, JSON."""

import json

from guided_diffusion.fileio import atomic_write
from guided_diffusion.respace import space_timesteps

from .settings import PHASES

# Respacings of the sampling-cost table: the paper's 1000/500/250-step ancestral runs and IDDPM's DDIM grids.
SAMPLING_COST_RESPACINGS = (("1000", "ancestral"), ("500", "ancestral"), ("250", "ancestral"),
                            ("ddim50", "DDIM"), ("ddim25", "DDIM"))
TABLE_COLUMNS = ("setting", "step", "batch", "median ms", "min–max ms", "images/s", "speed-up", "paired speed-ups",
                 "peak memory +MiB", "saved for backward MiB", "model GFLOP/s", "of matmul peak")


def _table_rows(result):
    """One list of cells (TABLE_COLUMNS) per setting and step, training steps first."""
    ratios = result["ratios"]
    for phase in PHASES:
        for name in result["meta"]["settings"]:
            entry = result["results"][name].get(phase)
            if entry is None:
                continue
            ratio = ratios.get(name, {}).get(phase)
            fraction = entry["matmul_peak_fraction"]
            saved = entry["memory"].get("saved_for_backward_mib")
            yield [
                name,
                phase,
                str(entry["batch_size"]),
                f"{entry['median_s'] * 1e3:.0f}",
                f"{entry['min_s'] * 1e3:.0f}–{entry['max_s'] * 1e3:.0f}",
                f"{entry['images_per_s']:.1f}",
                f"{ratio['speedup']:.2f}×" if ratio else "1.00×",
                f"{ratio['paired_min']:.2f}–{ratio['paired_max']:.2f}" if ratio else "",
                f"{entry['memory']['peak_increase_mib']:.0f}",
                f"{saved:.0f}" if saved is not None else "-",
                f"{entry['model_gflops_per_s']:.1f}",
                f"{100 * fraction:.1f}% ({entry['matmul_peak_dtype']})" if fraction is not None else "-",
            ]


def _summary(result):
    """Sentences on the run: config, machine, FLOPs, matmul peak, memory method and how to read the ratios."""
    meta = result["meta"]
    flops = result["model_flops_per_image"]
    memory_method = next(
        (entry["memory"]["method"] for per_phase in result["results"].values() for entry in per_phase.values()), ""
    )
    load = meta.get("load_average_start"), meta.get("load_average_end")
    load_text = f"{load[0][0]:.1f} -> {load[1][0]:.1f}" if all(load) else "n/a"
    return [
        f"Config `{meta['config']}`: {meta['config_description']}; training batch {meta['batch_size']['train']}, "
        f"sampling batch {meta['batch_size']['sample']}. Machine: {meta['machine']} ({meta['device']}), torch "
        f"{meta['torch']}; {meta['warmup']} warm-up and {meta['repeats']} timed steps per setting, interleaved "
        f"(load average {load_text}).",
        f"Model FLOPs per image (nominal): {flops['forward'] / 1e9:.2f} GFLOP forward, "
        f"{flops['forward_backward'] / 1e9:.2f} GFLOP forward+backward. Measured matmul peak: "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in result["matmul_peak_gflops"].items())
        + f". Memory: {memory_method}, as the increase over the level after imports and model build; saved for "
        "backward: the tensors autograd keeps during one training step, parameters excluded (not measured for "
        "compiled settings).",
        f"Speed-up: median of {result['ratios']['baseline']} / median; paired: range of the per-round ratios of "
        "interleaved steps.",
    ]


def format_table(result):
    """Plain-text table of a run, for the terminal."""
    rows = [list(TABLE_COLUMNS)] + list(_table_rows(result))
    widths = [max(len(row[k]) for row in rows) for k in range(len(TABLE_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) if k < 2 else cell.rjust(width) for k, (cell, width) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(_summary(result)[:1] + lines + _summary(result)[1:])


def format_comparison(result):
    """How many times as fast the second of two settings is as the first, per phase (for --compare)."""
    first, second = result["meta"]["settings"]
    lines = []
    for phase, ratio in result["ratios"][second].items():
        lines.append(
            f"{phase}: {second} is {ratio['speedup']:.3f}x as fast as {first} (median over median; per-round paired "
            f"ratios {ratio['paired_median']:.3f}, range {ratio['paired_min']:.3f}-{ratio['paired_max']:.3f})"
        )
    return "\n".join(lines)


def format_markdown(result, command=""):
    """The README's performance table for a run (and the sampling cost at its sampling speed)."""
    lines = _summary(result)[:1] + [""]
    lines.append("| " + " | ".join(TABLE_COLUMNS) + " |")
    lines.append("|---|---|" + "---:|" * (len(TABLE_COLUMNS) - 2))
    lines += ["| " + " | ".join(row) + " |" for row in _table_rows(result)]
    lines += [""] + _summary(result)[1:]
    if command:
        lines += ["", "Reproduce with:", "", "```", command, "```"]
    if any("sample" in per_phase for per_phase in result["results"].values()):
        lines += ["", "Sampling cost at the measured sampling speed:", "", format_sampling_cost(result=result)]
    return "\n".join(lines)


def sampling_cost_rows(diffusion_steps=1000, respacings=SAMPLING_COST_RESPACINGS):
    """Network evaluations per image of each respacing, counted from `space_timesteps` (one per kept step)."""
    rows = []
    for spec, sampler in respacings:
        evaluations = len(space_timesteps(diffusion_steps, spec))
        rows.append(dict(respacing=spec, sampler=sampler, network_evaluations=evaluations,
                         share_of_full=evaluations / diffusion_steps))
    return rows


def format_sampling_cost(diffusion_steps=1000, result=None):
    """Markdown table of sampling cost; with a run's result, also seconds per image at its sampling speed."""
    timed = []
    if result is not None:
        timed = [(name, per_phase["sample"]) for name, per_phase in result["results"].items() if "sample" in per_phase]
    header = "| respacing | sampler | network evaluations per image | share of 1000 steps |"
    rule = "|---|---|---:|---:|"
    for name, _ in timed:
        header += f" est. s per image, {name} ({result['meta']['config']}) |"
        rule += "---:|"
    lines = [header, rule]
    for row in sampling_cost_rows(diffusion_steps):
        line = (f"| `{row['respacing']}` | {row['sampler']} | {row['network_evaluations']} | "
                f"{row['share_of_full']:.3f} |")
        for _, entry in timed:
            line += f" {row['network_evaluations'] * entry['median_s'] / entry['batch_size']:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def write_text(path, text):
    """Write `text` (UTF-8) to `path` atomically: readers see the old file or the whole new one."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path, result):
    write_text(path, json.dumps(result, indent=1) + "\n")
