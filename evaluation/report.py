"""Results tables (markdown + JSON) and plots: accuracy against context length and against key-value pairs.

A results dict (what `evaluate` and `replicate` write as JSON):

    {"meta": {...},
     "models": {name: {"runs": [{"label": str, "lr": float?, "seed": int?}, ...],
                       "settings": {setting_name: {"task": str, "seq_len": int, "num_pairs": int,
                                                   "per_run": [Score.as_dict(), ...]}},
                       "perplexity": {"per_run": [...]}?}}}

Models trained with several learning rates and seeds report the learning rate whose seed-mean accuracy over all
settings is highest (the usual MQAR protocol), and the mean, standard deviation, minimum and maximum over its seeds.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import numpy as np


def best_runs(model: dict, task: Optional[str] = None) -> list[int]:
  """Indices of the runs of the learning rate with the best seed-mean accuracy (all runs if there is no lr), over
  the settings of `task` (None: every setting; a model trained on two tasks has a best learning rate per task)."""
  runs = model["runs"]
  lrs = sorted({r.get("lr") for r in runs}, key=lambda x: (x is None, x))
  if len(lrs) <= 1:
    return list(range(len(runs)))
  settings = [s for s in model["settings"].values() if task is None or s["task"] == task]

  def mean_acc(idx):
    return float(np.mean([[s["per_run"][i]["accuracy"] for s in settings] for i in idx]))

  groups = {lr: [i for i, r in enumerate(runs) if r.get("lr") == lr] for lr in lrs}
  best = max(groups, key=lambda lr: mean_acc(groups[lr]))
  return groups[best]


def spread(values: list[float]) -> dict[str, float]:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()), "n": len(v)}


def summary(results: dict) -> dict[str, dict[str, Any]]:
  """Per model and setting, the spread of accuracy over the seeds of the best learning rate."""
  out = {}
  for name, model in results["models"].items():
    idx = best_runs(model)
    row = {"best_runs": [model["runs"][i]["label"] for i in idx], "settings": {}, "best_runs_by_task": {}}
    by_task = {}
    for s in model["settings"].values():
      if s["task"] not in by_task:
        by_task[s["task"]] = best_runs(model, s["task"])
        row["best_runs_by_task"][s["task"]] = [model["runs"][i]["label"] for i in by_task[s["task"]]]
    for sname, s in model["settings"].items():
      idx = by_task[s["task"]]
      row["settings"][sname] = {
          "accuracy": spread([s["per_run"][i]["accuracy"] for i in idx]),
          "exact_match": spread([s["per_run"][i]["exact_match"] for i in idx]),
      }
    if model.get("perplexity"):
      row["perplexity"] = spread([model["perplexity"]["per_run"][i]["perplexity"] for i in idx])
    out[name] = row
  return out


def _fmt(s: dict[str, float]) -> str:
  if s["n"] == 1:
    return f"{100 * s['mean']:.1f}"
  return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


# Below this value accuracy on every setting, a run has not learned the task (MQAR's chance is 2 / vocab_size).
NOT_LEARNED = 0.05


def not_learned(results: dict, threshold: float = NOT_LEARNED) -> dict[str, float]:
  """`{model: best accuracy}` for the models none of whose runs reached `threshold` on any setting: a table of
  such models compares plateaus, not recall."""
  out = {}
  for name, model in results["models"].items():
    best = max((r["accuracy"] for s in model["settings"].values() for r in s["per_run"]), default=0.0)
    if best < threshold:
      out[name] = best
  return out


def markdown(results: dict, title: str = "Retrieval evaluation") -> str:
  """A markdown report: one table per task (rows: models; columns: settings), accuracy in % (mean ± std). Models
  that never left chance (`not_learned`) are named in a warning above the tables."""
  summ = summary(results)
  lines = [f"## {title}", ""]
  meta = results.get("meta", {})
  for k in ("command", "device", "date", "note"):
    if k in meta:
      lines.append(f"- {k}: {meta[k]}")
  stuck = not_learned(results)
  if stuck:
    names = ", ".join(f"{m} ({100 * a:.1f}%)" for m, a in stuck.items())
    lines.append(f"- **WARNING: no run of {names} reached {100 * NOT_LEARNED:.0f}% value accuracy on any setting "
                 f"(best run in brackets): they did not learn the task, so their rows compare nothing.**")
  lines.append("")
  tasks = []
  for model in results["models"].values():
    for s in model["settings"].values():
      if s["task"] not in tasks:
        tasks.append(s["task"])
  for task in tasks:
    found = {}
    for model in results["models"].values():
      for sname, s in model["settings"].items():
        if s["task"] == task:
          found[sname] = (s["seq_len"], s.get("num_pairs") or 0, sname)
    names = [n for *_, n in sorted(found.values())]  # by context length, then pairs
    metric = "accuracy" if task == "mqar" else "exact_match"
    lines.append(f"### {task}: {'token accuracy on the values' if task == 'mqar' else 'exact match of the answer'} (%)")
    lines.append("")
    cols = [n.split(" ", 1)[1] for n in names]
    lines.append("| model | runs | " + " | ".join(cols) + " |")
    lines.append("|---|---|" + "---|" * len(cols))
    for mname, row in summ.items():
      cells = [_fmt(row["settings"][n][metric]) if n in row["settings"] else "" for n in names]
      if any(cells):
        best = row["best_runs_by_task"].get(task, row["best_runs"])
        lines.append(f"| {mname} | {', '.join(best)} | " + " | ".join(cells) + " |")
    lines.append("")
  if any("perplexity" in r for r in summ.values()):
    lines += ["### held-out perplexity", "", "| model | perplexity |", "|---|---|"]
    for mname, row in summ.items():
      if "perplexity" in row:
        p = row["perplexity"]
        lines.append(f"| {mname} | {p['mean']:.2f}" + (f" ± {p['std']:.2f}" if p["n"] > 1 else "") + " |")
    lines.append("")
  return "\n".join(lines)


def _series(results: dict, task: str, x_key: str, fixed_key: str, fixed: Optional[int], metric: str):
  """Per model: sorted x values, seed means and stds of `metric` where `fixed_key == fixed` (None: any)."""
  summ = summary(results)
  out = {}
  for mname, model in results["models"].items():
    pts = []
    for sname, s in model["settings"].items():
      if s["task"] != task or (fixed is not None and s[fixed_key] != fixed):
        continue
      sp = summ[mname]["settings"][sname][metric]
      pts.append((s[x_key], sp["mean"], sp["std"]))
    if pts:
      pts.sort()
      out[mname] = tuple(np.array(v) for v in zip(*pts))
  return out


def plot_lines(results: dict, path: str, *, task: str, x_key: str, fixed_key: str, fixed: Optional[int],
               metric: str = "accuracy", title: str = "") -> Optional[str]:
  """One line per model (error bars: std over seeds); returns `path`, or None when there is nothing to plot."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  series = _series(results, task, x_key, fixed_key, fixed, metric)
  if not series or all(len(v[0]) < 1 for v in series.values()):
    return None
  fig, ax = plt.subplots(figsize=(6.0, 4.0))
  for mname, (x, m, s) in series.items():
    ax.errorbar(x, 100 * m, yerr=100 * s, marker="o", capsize=3, label=mname)
  ax.set_xscale("log", base=2)
  ax.set_xticks(sorted({int(v) for xs in series.values() for v in xs[0]}))
  ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.set_xlabel({"seq_len": "context length T (tokens)", "num_pairs": "key-value pairs"}[x_key])
  ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
  ax.set_ylim(-2, 102)
  ax.grid(alpha=0.3)
  ax.set_title(title or f"{task}" + (f", {fixed_key.replace('_', ' ')} = {fixed}" if fixed is not None else ""))
  ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _most_common(values: list[int]) -> Optional[int]:
  if not values:
    return None
  vals, counts = np.unique(values, return_counts=True)
  best = counts.max()
  return int(max(v for v, c in zip(vals, counts) if c == best))  # ties: the largest (hardest) setting


def default_plots(results: dict, out_dir: str) -> list[str]:
  """MQAR accuracy vs T (at the pair count with most lengths) and vs pairs (at the longest T); needles vs T."""
  made = []
  settings = [s for m in results["models"].values() for s in m["settings"].values()]
  mq = [s for s in settings if s["task"] == "mqar"]
  if mq:
    by_pairs = {}
    for s in mq:
      by_pairs.setdefault(s["num_pairs"], set()).add(s["seq_len"])
    pairs = max(by_pairs, key=lambda p: (len(by_pairs[p]), p))
    t_max = max(s["seq_len"] for s in mq)
    made.append(plot_lines(results, os.path.join(out_dir, "mqar_acc_vs_length.png"), task="mqar", x_key="seq_len",
                           fixed_key="num_pairs", fixed=pairs))
    made.append(plot_lines(results, os.path.join(out_dir, "mqar_acc_vs_pairs.png"), task="mqar", x_key="num_pairs",
                           fixed_key="seq_len", fixed=t_max))
  for task in sorted({s["task"] for s in settings} - {"mqar"}):
    made.append(plot_lines(results, os.path.join(out_dir, f"{task}_vs_length.png"), task=task, x_key="seq_len",
                           fixed_key="num_pairs", fixed=None, metric="exact_match"))
  return [p for p in made if p]


def _clean(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return _clean(x.item())
  return x


def write(results: dict, out_dir: str, title: str = "Retrieval evaluation", plots: bool = True) -> dict[str, Any]:
  """Writes `results.json`, `summary.json`, `results.md` and the plots into `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": os.path.join(out_dir, "results.json"), "summary": os.path.join(out_dir, "summary.json"),
           "markdown": os.path.join(out_dir, "results.md")}
  with open(paths["json"], "w") as f:
    json.dump(_clean(results), f, indent=1)
  with open(paths["summary"], "w") as f:
    json.dump(_clean(summary(results)), f, indent=1)
  md = markdown(results, title)
  paths["plots"] = default_plots(results, out_dir) if plots else []
  if paths["plots"]:
    md += "\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in paths["plots"]) + "\n"
  with open(paths["markdown"], "w") as f:
    f.write(md)
  return paths


def merge(paths: list[str]) -> dict:
  """Joins several `results.json` files (e.g. one study split over calls by `--mixers`) into one results dict.

  `meta` lists every part; models are taken in order. A model of the same name from a part of another task (MQAR
  and MK-NIAH-1 trained separately on the same lr x seed grid) gains that task's settings; one of the same task
  replaces the earlier one. Parts of one task that trained for different step counts are flagged in the note.
  """
  out: dict[str, Any] = {"meta": {"note": "merged from " + ", ".join(paths)}, "models": {}, "parts": []}
  for p in paths:
    with open(p) as f:
      part = json.load(f)
    task = part.get("meta", {}).get("task", "mqar")
    out["parts"].append({"path": p, "meta": part.get("meta", {}), "task": task,
                         "steps_done": {m: e.get("steps_done") for m, e in part["models"].items()}})
    for name, entry in part["models"].items():
      old = out["models"].get(name)
      if old is None:
        out["models"][name] = dict(entry)
        continue
      old_tasks = {s["task"] for s in old["settings"].values()}
      new_tasks = {s["task"] for s in entry["settings"].values()}
      if old_tasks.isdisjoint(new_tasks) and old["runs"] == entry["runs"]:
        merged = dict(old)
        merged["settings"] = {**old["settings"], **entry["settings"]}
        merged["steps_done_by_task"] = {**old.get("steps_done_by_task", {t: old.get("steps_done") for t in old_tasks}),
                                        **{t: entry.get("steps_done") for t in new_tasks}}
        out["models"][name] = merged
      else:
        out["models"][name] = dict(entry)
  for task in {part["task"] for part in out["parts"]}:
    steps = {s for part in out["parts"] if part["task"] == task for s in part["steps_done"].values()}
    if len(steps) > 1:
      out["meta"]["note"] += f"; WARNING: the {task} parts trained for different step counts {sorted(steps)}"
  return out


def main(argv=None) -> int:
  """`python -m evaluation.report OUT_DIR results.json [results.json ...]`: merge and write tables and plots."""
  import sys
  args = list(sys.argv[1:] if argv is None else argv)
  if len(args) < 2:
    print(main.__doc__)
    return 2
  import datetime
  merged = merge(args[1:])
  devices = sorted({part["meta"].get("device", "?") for part in merged["parts"]})
  merged["meta"].update(command="python -m evaluation.report " + " ".join(args), device=", ".join(devices),
                        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
  paths = write(merged, args[0], title="Replication study (merged)")
  print(paths["markdown"])
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
