"""The ``task`` suite's report: steps to reach plain LoRA's accuracy, the means over seeds, the tables and the
plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot", "print_tables", "steps_to_reach", "summarize"]


def steps_to_reach(evals: Sequence[tuple[int, float]], target: float | None) -> int | None:
    """The first mark (step 0 = the base model included) whose accuracy is at least ``target``."""
    if target is None:
        return None
    return next((step for step, acc in evals if acc >= target - 1e-12), None)


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Means over seeds per (method, lr): accuracy at each mark, final accuracy, steps to reach plain LoRA's final
    accuracy (the mean over the seeds that reached it, and how many did), estimation seconds."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["lr"]), []).append(r)
    out = []
    for (method, lr), rs in groups.items():
        marks = [step for step, _ in rs[0]["evals"]]
        reached = [r["steps_to_reference"] for r in rs if r["steps_to_reference"] is not None]
        est = [r["estimation"]["seconds"] for r in rs if r["estimation"]]
        out.append({"method": method, "lr": lr, "seeds": [r["seed"] for r in rs],
                    "accuracy_at": {str(m): sum(dict(r["evals"])[m] for r in rs) / len(rs) for m in marks},
                    "final_accuracy": sum(r["final_accuracy"] for r in rs) / len(rs),
                    "steps_to_reference": sum(reached) / len(reached) if reached else None,
                    "reached": f"{len(reached)}/{len(rs)}",
                    "estimation_s": sum(est) / len(est) if est else None,
                    "train_s_per_step": sum(r["train_s_per_step"] for r in rs) / len(rs)})
    return out


def print_tables(result: dict[str, Any]) -> None:
    runs, summary = result["runs"], result["summary"]
    marks = [step for step, _ in runs[0]["evals"]] if runs else []
    print(f"exact-match accuracy on {result['task']['test_problems']} held-out problems; base model "
          f"{result['base_accuracy']:.3f}")
    head = "accuracy at " + "/".join(map(str, marks))
    print(f"{'method':13s} {'lr':8s} {'seed':4s}  {'est. batches':12s} {'est. s':>7s}  {head:30s} {'final':>6s}  "
          "reaches LoRA's final")
    for r in runs:
        est = r["estimation"]
        used = "-" if not est else f"{est['batches']}" + (f" x{est['train_step_calls']}" if est["train_step_calls"] > 1
                                                          else "") + (" conv" if est.get("converged") else "")
        accs = "/".join(f"{acc:.3f}" for _, acc in r["evals"])
        reach = r["steps_to_reference"]
        print(f"{r['method']:13s} {r['lr']:<8g} {r['seed']:<4d}  {used:12s} "
              f"{est['seconds'] if est else 0:7.1f}  {accs:30s} {r['final_accuracy']:6.3f}  "
              + (f"step {reach}" if reach is not None else "-"))
    print(f"\nmeans over seeds\n{'method':13s} {'lr':8s} {'seeds':5s}  {'est. s':>7s}  {head:30s} {'final':>6s}  "
          "reaches LoRA's final (mean step, seeds reaching)")
    for s in summary:
        accs = "/".join(f"{s['accuracy_at'][str(m)]:.3f}" for m in marks)
        reach = "-" if s["steps_to_reference"] is None else f"{s['steps_to_reference']:.0f}"
        est = "-" if s["estimation_s"] is None else f"{s['estimation_s']:.1f}"
        print(f"{s['method']:13s} {s['lr']:<8g} {len(s['seeds']):<5d}  {est:>7s}  {accs:30s} "
              f"{s['final_accuracy']:6.3f}  {reach} ({s['reached']})")


def plot(result: dict[str, Any], path: Path) -> bool:
    """Accuracy per mark (mean over seeds, each seed thin) and the training loss; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4))
    for i, s in enumerate(result["summary"]):
        color = f"C{i}"
        label = f"{s['method']}, lr {s['lr']:g}"
        mine = [r for r in result["runs"] if r["method"] == s["method"] and r["lr"] == s["lr"]]
        steps = [int(m) for m in s["accuracy_at"]]
        ax_acc.plot(steps, list(s["accuracy_at"].values()), marker="o", ms=3, color=color, label=label)
        for r in mine:
            ax_acc.plot(*zip(*r["evals"]), color=color, lw=0.5, alpha=0.4)
        n = min(len(r["losses"]) for r in mine)
        mean = [sum(r["losses"][j] for r in mine) / len(mine) for j in range(n)]
        smooth, m = [], mean[0]
        for v in mean:
            m = 0.9 * m + 0.1 * v
            smooth.append(m)
        ax_loss.plot(range(1, n + 1), smooth, color=color, label=label)
    ax_acc.axhline(result["base_accuracy"], color="k", lw=0.6, ls="--")
    ax_acc.set(xlabel="step", ylabel="exact-match accuracy",
               title=f"{result['task']['test_problems']} held-out arithmetic word problems")
    ax_loss.set(xlabel="step", ylabel="training loss on the answer (EMA 0.9, mean of seeds)",
                title=result["model"].split(" (")[0])
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
